"Nothing logged is ever lost (issue 12): each data-loss path found by fault injection, reproduced on real stores"
import gzip, json, logging, os, sqlite3, subprocess, sys, time
from pathlib import Path
import numpy as np, pytest, torch
from coronary_mlops.config import load_settings, redact_text
from coronary_mlops.tracker import MLflowTracker, TrackerError
from coronary_mlops.artifacts import MLflowArtifactManager, ArtifactIntegrityError, ArtifactUploadError
from coronary_mlops.storage import UnsafeCheckpointError, load_checkpoint, snapshot_state
from coronary_mlops import registry

pytestmark = pytest.mark.server


def sqlite_settings(tmp_path, name='rel', **kw):
    return load_settings(False, store_dir=str(tmp_path/'store'), experiment_name=name, **kw)


def points(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- 1. two runs logged in turn, from four processes ---------------------------------------------------------------

ALTERNATING = """
import sys
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
uri, store, i, shared = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tr = MLflowTracker(settings=load_settings(False, store_dir=store, tracking_uri=uri, experiment_name='alternating'))
run = tr.start_run(run_name=f'worker-{i}')
for step in range(5000):
    tr.log_metric('loss', step * 1e-4 + i, step=step)
    tr.log_metric(f'loss_{i}', step * 1e-4, step=step, run_id=shared)
done = tr.end_run()
tr.close()
print(run.run_id, done)
"""


@pytest.mark.parametrize('kind', ['sqlite', 'server'])
def test_four_processes_alternating_own_and_shared_run_lose_nothing(kind, request, tmp_path, clean_env):
    "4 processes × (5,000 points to their own run + 5,000 to a shared one), interleaved: exactly 40,000 arrive"
    uri = request.getfixturevalue('server_stack').uri if kind == 'server' else f"sqlite:///{tmp_path/'shared.db'}"
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'main'), tracking_uri=uri,
                                              experiment_name='alternating'))
    shared = tr.client.create_run(tr.experiment_id, run_name='shared').info.run_id
    procs = [subprocess.Popen([sys.executable, '-c', ALTERNATING, uri, str(tmp_path/f'c{i}'), str(i), shared],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try: outs = [p.communicate(timeout=500) for p in procs]
    finally:
        for p in procs: p.kill()
    assert all(p.returncode == 0 for p in procs), [(p.returncode, o[1][-1500:]) for p, o in zip(procs, outs)]
    total = 0
    for i, (out, _) in enumerate(outs):
        own, done = out.strip().splitlines()[-1].split()
        assert done == 'True'  # end_run says the store has everything
        mine, theirs = points(tr.client, own, 'loss'), points(tr.client, shared, f'loss_{i}')
        assert [s for s, _ in mine] == list(range(5000)) and [s for s, _ in theirs] == list(range(5000))  # no gaps, no duplicates
        assert mine[77][1] == pytest.approx(77e-4 + i)
        assert tr.client.get_run(own).info.status == 'FINISHED'
        total += len(mine) + len(theirs)
    assert total == 40_000


# --- 2. one bad record must not block the queue -----------------------------------------------------------------

def test_a_bad_step_is_refused_at_the_call(tmp_path, clean_env):
    tr = MLflowTracker(settings=sqlite_settings(tmp_path))
    with tr.start_run() as run:
        with pytest.raises(ValueError, match='outside'): tr.log_metric('x', 1.0, step=2**63)
        with pytest.raises(ValueError, match='step must be an integer'): tr.log_metric('x', 1.0, step=1.9)
        with pytest.raises(TypeError, match="expected a number, got str '0.5'"): tr.log_metric('x', '0.5')
        with pytest.raises(ValueError, match="metric 'x'.*too large"): tr.log_metric('x', 10**400)
        tr.log_metric('x', 2.0, step=3)
    assert points(tr.client, run.run_id, 'x') == [(3, 2.0)]


def test_a_record_the_store_refuses_is_set_aside_alone(tmp_path, clean_env):
    "A record that got past the checks and that SQLite cannot hold: the others of every run still arrive"
    tr = MLflowTracker(settings=sqlite_settings(tmp_path))
    a = tr.start_run(run_name='a').run_id
    b = tr.client.create_run(tr.experiment_id, run_name='b').info.run_id
    ts = int(time.time() * 1000)
    for step in range(5): tr.log_metric('loss', 0.1 * step, step=step)
    tr.queue.push((a, 'm', 'loss', 9.0, 2**63, ts))  # as if a caller had bypassed the checks
    for step in range(5, 10): tr.log_metric('loss', 0.1 * step, step=step); tr.log_metric('other', 1.0, step=step, run_id=b)
    assert tr.flush(raise_errors=False) is True and tr.pending == 0  # nothing waits forever
    with pytest.raises(TrackerError, match=r"(?s)metric 'loss' = 9.0 at step 9223372036854775808.*kept in"): tr.flush()
    assert [s for s, _ in points(tr.client, a, 'loss')] == list(range(10))
    assert len(points(tr.client, b, 'other')) == 5
    rejected = list((tr.spool_dir/'rejected').glob('*.jsonl'))
    assert [json.loads(l)[4] for f in rejected for l in f.read_text().splitlines()] == [2**63]
    tr.end_run(); tr.close()


def test_bad_artifact_names_are_refused_at_the_call_and_later_epochs_upload(tmp_path, clean_env):
    s = sqlite_settings(tmp_path)
    client = s.client()
    from coronary_mlops.config import get_or_create_experiment
    rid = client.create_run(get_or_create_experiment(s, client)).info.run_id
    long = tmp_path/('x' * 236 + '.log'); long.write_text('long')
    with MLflowArtifactManager(s, client) as m:
        with pytest.raises(ValueError, match='MLflow'): m.log_epoch(0, metrics={'dice!': .5}, run_id=rid)
        with pytest.raises(ValueError, match='MLflow allows 250'): m.log_epoch(0, metrics={'d' * 300: .5}, run_id=rid)
        with pytest.raises(ValueError, match='path component of 240 bytes'): m.log_epoch(0, artifacts={'logs': long}, run_id=rid)
        for e in (1, 2): m.log_epoch(e, metrics={'dice': .5 + e / 10}, run_id=rid)
        m.flush()
        assert m.epochs(rid) == [1, 2] and m.spooled() == [] and m.verify(rid).ok


def test_an_epoch_the_store_refuses_does_not_block_later_epochs_or_runs(tmp_path, clean_env):
    "Epochs of a deleted run are set aside with an error that names them; another run's epochs go up"
    s = sqlite_settings(tmp_path)
    client = s.client()
    from coronary_mlops.config import get_or_create_experiment
    eid = get_or_create_experiment(s, client)
    gone, alive = client.create_run(eid).info.run_id, client.create_run(eid).info.run_id
    client.delete_run(gone)
    m = MLflowArtifactManager(s, client, retries=2, backoff=0.01)
    m.log_epoch(0, metrics={'dice': 0.5}, run_id=gone)
    m.log_epoch(0, metrics={'dice': 0.6}, run_id=alive)
    with pytest.raises(ArtifactUploadError, match=f'epoch 0 of run {gone}'): m.flush()
    m.log_epoch(1, metrics={'dice': 0.7}, run_id=alive); m.flush()
    assert m.epochs(alive) == [0, 1] and m.spooled() == [] and m.replay_spool() == 0
    assert list((m.uploader.spool_dir/'rejected').glob(f'{gone}-000-*/job.json'))
    m.close()


# --- 3. the key rule is MLflow's -------------------------------------------------------------------------------

def test_keys_mlflow_would_refuse_in_a_batch_are_refused_at_the_call(tmp_path, clean_env):
    tr = MLflowTracker(settings=sqlite_settings(tmp_path))
    with tr.start_run() as run:
        for bad in ('loss/', './loss', 'a//b'):
            with pytest.raises(ValueError, match='not a clean relative path'): tr.log_metric(bad, 1.0)
        for step in range(600): tr.log_metric('loss', 1.0, step=step)
    assert len(points(tr.client, run.run_id, 'loss')) == 600


# --- 4. an epoch recovered after its process died ------------------------------------------------------------------

KILL_LOOP = """
import json, os, signal, sys, torch
from pathlib import Path
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
store, rid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
unwritten = 0
for epoch in range(n):
    pid = os.fork()  # torch and MLflow imported once; nothing has run a torch op or a thread in this parent
    if pid == 0:
        m = MLflowArtifactManager(load_settings(False, store_dir=store))
        state = {'w': torch.full((2, 2), float(epoch)), 'big': torch.full((2_000_000,), float(epoch)), 'epoch': epoch}
        m.log_epoch(epoch, state, {'val_dice': epoch / 10}, run_id=rid)
        os.kill(os.getpid(), signal.SIGKILL)  # right after log_epoch returns
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    jobs = list(Path(store, 'staging').glob(f'{pid}-*/*/job.json'))
    assert len(jobs) <= 1, jobs
    ck = f'checkpoints/epoch_{epoch:03d}/model.pt'
    unwritten += sum(not (j.parent/'tree'/ck).exists() for j in jobs)
print(json.dumps(dict(unwritten=unwritten)))
"""


def test_ten_sigkills_right_after_log_epoch_lose_no_epoch_and_no_checkpoint(tmp_path, clean_env):
    s = sqlite_settings(tmp_path)
    client = s.client()
    from coronary_mlops.config import get_or_create_experiment
    rid = client.create_run(get_or_create_experiment(s, client)).info.run_id
    store = str(tmp_path/'store')
    r = subprocess.run([sys.executable, '-c', KILL_LOOP, store, rid, '10'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    unwritten = json.loads(r.stdout.strip().splitlines()[-1])['unwritten']
    # the documented command, in a fresh process
    sync = subprocess.run([str(Path(sys.executable).parent/'coronary-mlops'), '--store-dir', store, 'sync'],
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, sync.stdout + sync.stderr[-3000:]
    m = MLflowArtifactManager(s, client)
    assert m.epochs(rid) == list(range(10))
    for e in range(10):
        ck = load_checkpoint(m.download(rid, f'checkpoints/epoch_{e:03d}/model.pt', tmp_path/f'dl{e}'))
        assert torch.equal(ck['w'], torch.full((2, 2), float(e))) and ck['epoch'] == e
        assert torch.equal(ck['big'], torch.full((2_000_000,), float(e)))
    rep = m.verify(rid)
    assert rep.ok, rep
    assert client.get_run(rid).data.tags['coronary_mlops.best_checkpoint'] == 'checkpoints/epoch_009/model.pt'
    assert not list((tmp_path/'store'/'staging').glob('*/*/job.json'))  # nothing left behind
    m.close()
    print(f"{unwritten} of 10 killed epochs had no checkpoint written by their worker; all 10 recovered")
    assert unwritten >= 1  # the kill came before the worker at least once, so the rebuild from the slab was exercised


KILLED = """
import os, shutil, torch
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
m = MLflowArtifactManager(load_settings(False, store_dir={store!r}))
m.log_epoch(0, torch.nn.Linear(2, 2), {{'val_dice': 0.5}}, run_id={rid!r}); m.flush()
m.uploader._submit = lambda *a: None  # the process dies before its worker writes anything...
m.log_epoch(1, torch.nn.Linear(2, 2), {{'val_dice': 0.9}}, run_id={rid!r})
shutil.rmtree(m.uploader.staging/'slabs')  # ...and its snapshot is gone too (a disk wiped under it)
os._exit(0)
"""


def test_a_checkpoint_lost_with_its_process_and_its_snapshot_is_reported_and_never_tagged(tmp_path, clean_env):
    s = sqlite_settings(tmp_path)
    client = s.client()
    from coronary_mlops.config import get_or_create_experiment
    rid = client.create_run(get_or_create_experiment(s, client)).info.run_id
    subprocess.run([sys.executable, '-c', KILLED.format(store=str(tmp_path/'store'), rid=rid)], check=True, timeout=120)
    m = MLflowArtifactManager(s, client)
    assert m.replay_spool() == 1 and m.epochs(rid) == [0, 1]
    tags = client.get_run(rid).data.tags
    assert tags['coronary_mlops.best_checkpoint'] == 'checkpoints/epoch_000/model.pt'  # never the file that is not there
    rep = m.verify(rid)
    assert rep.missing == ['checkpoints/epoch_001/model.pt'] and not rep.ok
    with pytest.raises(ArtifactIntegrityError, match='never stored'): m.download(rid, 'checkpoints/epoch_001/model.pt', tmp_path)
    assert m.best_checkpoint(rid)['weight'].shape == (2, 2)
    m.close()


# --- 5. retried local uploads ------------------------------------------------------------------------------------

def test_a_retried_local_upload_leaves_no_temporary_files(tmp_path, clean_env):
    s = sqlite_settings(tmp_path)
    with MLflowArtifactManager(s) as m:
        client = m.client
        from coronary_mlops.config import get_or_create_experiment
        rid = client.create_run(get_or_create_experiment(s, client)).info.run_id
        tree = Path(s.store_dir)/'tree'; (tree/'logs').mkdir(parents=True); (tree/'logs'/'a.log').write_text('x')
        for _ in range(3): m.uploader.upload_tree(rid, tree)  # the same job retried after a partial upload
        root = Path(m.reader.repo(rid).artifact_dir)
        assert sorted(p.name for p in root.rglob('*') if p.is_file()) == ['a.log']


# --- 6. secrets on every path --------------------------------------------------------------------------------------

def test_secrets_on_every_path_never_reach_the_store_or_the_logs(tmp_path, clean_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    env_secret = 'env-' + os.urandom(6).hex()
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', env_secret)
    planted = ['pw-in-uri-77', 'tok-in-list-88', 'desc-pw-99', 'dict-art-pw-11', 'meta-tok-22', 'exc-pw-33', 'tag-tok-44',
               env_secret]
    s = sqlite_settings(tmp_path)
    tr = MLflowTracker(settings=s)
    with pytest.raises(RuntimeError):
        with tr.start_run(description=f"trained against postgresql://ml:{planted[2]}@db/x") as run:
            tr.log_params({'stages': [{'api_token': planted[1]}], 'db': ['postgresql://u:' + planted[0] + '@h/db'],
                           'note': f"uses {env_secret}"})
            tr.set_tags({'deploy': f"https://ci:{planted[6]}@ci.example/job"})
            tr.log_epoch(0, metrics={'dice': 0.5}, artifacts={'config': {'db_password': planted[3], 'lr': 0.1}},
                         metadata={'hyperparameters': {'service': {'token': planted[4]}}})
            tr.artifacts.flush()
            raise RuntimeError(f"lost connection to postgresql://ml:{planted[5]}@db/x")
    tr.close()
    store = Path(s.store_dir)
    dump = '\n'.join(sqlite3.connect(store/'mlflow.db').iterdump())
    files = [p for p in store.rglob('*') if p.is_file() and p.suffix != '.db']
    texts = [(gzip.decompress(p.read_bytes()) if p.suffix == '.gz' else p.read_bytes()).decode('utf-8', 'replace') for p in files]
    logs = '\n'.join(r.getMessage() for r in caplog.records)
    for secret in planted:
        assert secret not in dump and secret not in logs and not any(secret in t for t in texts), secret
    run_data = tr.client.get_run(run.run_id).data
    assert run_data.tags['coronary_mlops.end_reason'] == 'RuntimeError: lost connection to postgresql://ml:***@db/x'
    assert '***' in run_data.params['stages'] and 'lr' in json.dumps(texts)  # the rest is kept


# --- 7 and 8. swapped checkpoints, and a resume that fails ------------------------------------------------------

def test_a_swapped_checkpoint_is_an_integrity_error_and_a_failed_resume_leaves_the_run_as_it_was(tmp_path, clean_env):
    from coronary_mlops.train import TrainConfig, train
    from coronary_mlops.data import PhantomConfig
    s = sqlite_settings(tmp_path, name='resume')
    tr = MLflowTracker(settings=s)
    cfg = TrainConfig(epochs=1, roi_size=(16, 16, 16), channels=(4, 8), strides=(2,), samples_per_case=1, amp=False)
    res = train(cfg, synthetic=4, tracker=tr, phantom=PhantomConfig(shape=(24, 24, 24)), progress=False, work_dir=tmp_path/'w')
    ckpt = tr.get_run_info(res.run_id).tags['coronary_mlops.best_checkpoint']
    path = Path(tr.artifacts.reader.repo(res.run_id).artifact_dir)/ckpt
    swapped = torch.load(path, weights_only=True); swapped['epoch'] = 99
    path.unlink(); torch.save(swapped, path)  # a different, loadable checkpoint under the same name
    with pytest.raises(ArtifactIntegrityError, match='does not match the sha256'):
        registry.download_artifacts(res.run_id, [ckpt], tmp_path/'dl', tracker=tr, progress=False)
    with pytest.raises(ArtifactIntegrityError):
        train(cfg, synthetic=4, tracker=tr, resume=res.run_id, phantom=PhantomConfig(shape=(24, 24, 24)), progress=False,
              work_dir=tmp_path/'w2')
    assert tr.client.get_run(res.run_id).info.status == 'FINISHED'  # checked first, so the old run was not touched
    tr.close()


# --- silent wrong results and errors that hide the cause ------------------------------------------------------------

def test_params_that_would_be_stored_wrong_are_errors(tmp_path, clean_env):
    tr = MLflowTracker(settings=sqlite_settings(tmp_path))
    with tr.start_run():
        with pytest.raises(ValueError, match="'a.b' is given twice"): tr.log_params({'a.b': 1, 'a': {'b': 2}})
        with pytest.raises(TypeError, match="param 'opt'.*cannot store a object"): tr.log_params({'opt': object()})
        assert tr.log_params({'ok': [1, 2]}) == {'ok': '[1,2]'}


def test_state_dicts_that_cannot_be_saved_safely_name_the_tensor(tmp_path):
    with pytest.raises(TypeError, match=r"model_state\['w'\] is a torch.sparse_coo tensor"):
        snapshot_state({'w': torch.eye(3).to_sparse()})
    with pytest.raises(TypeError, match=r"model_state\['w'\] is a meta tensor"):
        snapshot_state({'w': torch.empty(3, device='meta')})


def test_a_malicious_checkpoint_is_refused_as_unsafe(tmp_path):
    class Payload:
        def __reduce__(self): return (os.system, ('touch ' + str(tmp_path/'pwned'),))
    torch.save({'model': {}, 'x': Payload()}, tmp_path/'evil.pt')
    with pytest.raises(UnsafeCheckpointError, match='refused as unsafe.*Do not load it with weights_only=False'):
        load_checkpoint(tmp_path/'evil.pt')
    assert not (tmp_path/'pwned').exists()


def test_a_tampered_gz_in_a_local_store_is_not_blamed_on_s3(tmp_path, clean_env):
    s = sqlite_settings(tmp_path)
    vol = tmp_path/'pred.npy'; np.save(vol, np.zeros((64, 64, 64), np.float32))
    with MLflowArtifactManager(s, compress_threshold_mb=0.1) as m:
        from coronary_mlops.config import get_or_create_experiment
        rid = m.client.create_run(get_or_create_experiment(s, m.client)).info.run_id
        p = m.log_epoch(0, artifacts={'predictions': vol}, run_id=rid)['predictions']
        m.flush()
        stored = Path(m.reader.repo(rid).artifact_dir)/(p + '.gz')
        stored.unlink(); stored.write_bytes(b'not gzip at all')
        with pytest.raises(ArtifactIntegrityError) as e: m.download(rid, p, tmp_path/'back')
        assert 'S3' not in str(e.value) and 'changed after it was logged' in str(e.value)


def test_redact_text_keeps_ordinary_text(tmp_path):
    assert redact_text('epoch 3: val_dice 0.91, key frames 12', environ={}) == 'epoch 3: val_dice 0.91, key frames 12'
