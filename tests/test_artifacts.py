"The epoch artifact manager against a real SQLite store and a real `mlflow server` with proxied artifacts"
import gzip, json, logging, math, multiprocessing as mp, os, random, signal, subprocess, sys, threading, time, uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import nibabel as nib, numpy as np, pytest, torch
from mlflow.utils.mlflow_tags import LATEST_CHECKPOINT_ARTIFACT_TAG_KEY

from coronary_mlops.config import load_settings, get_or_create_experiment
from coronary_mlops import artifacts as A
from coronary_mlops.artifacts import (MLflowArtifactManager, ArtifactUploadError, ArtifactIntegrityError, atomic_torch_save, load_checkpoint,
                                      check_name)
from servers import MlflowServer


def walk(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out.extend(walk(client, run_id, f.path) if f.is_dir else [f.path])
    return set(out)


def net(seed=0):
    torch.manual_seed(seed); return torch.nn.Conv3d(1, 2, 3)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp('mlflow-server')) as s: yield s


def make_store(tmp_path, tracking_uri=None, **kw):
    s = load_settings(settings_file=False, environ={}, store_dir=tmp_path/'store', tracking_uri=tracking_uri, **kw)
    client = s.client()
    rid = client.create_run(get_or_create_experiment(s, client, name=f"t-{uuid.uuid4().hex[:6]}")).info.run_id
    return SimpleNamespace(settings=s, client=client, run_id=rid, tmp=tmp_path)


@pytest.fixture(params=['sqlite', 'server'])
def store(request, tmp_path, clean_env):
    uri = request.getfixturevalue('server').uri if request.param == 'server' else None
    return make_store(tmp_path, uri)


# ---------------------------------------------------------------- layout, value types, telemetry

def test_epoch_tree_is_the_documented_layout(store):
    t = store.tmp
    fig, ax = plt.subplots(); ax.plot([3, 2, 1])
    (t/'preds').mkdir(); (t/'preds'/'a.nii.gz').write_bytes(b'a' * 10); (t/'preds'/'b.nii.gz').write_bytes(b'b' * 10)
    (t/'samples'/'sub').mkdir(parents=True); (t/'samples'/'x.png').write_bytes(b'\x89PNG1'); (t/'samples'/'sub'/'y.png').write_bytes(b'\x89PNG2')
    (t/'train.log').write_text('epoch 5 ok\n'); (t/'attn.png').write_bytes(b'\x89PNG3')
    with MLflowArtifactManager(store.settings, store.client) as m:
        paths = m.log_epoch(5, net(), {'train_loss': 0.15, 'val_dice': 0.7}, run_id=store.run_id,
                            artifacts={'training_curves': fig, 'predictions': [t/'preds'/'a.nii.gz', t/'preds'/'b.nii.gz'],
                                       'sample_images': t/'samples', 'config': {'lr': 0.001}, 'logs': t/'train.log',
                                       'attention': t/'attn.png'})
    expected = {'checkpoints/epoch_005/model.pt', 'metrics/epoch_005/metrics.json', 'metadata/epoch_005/metadata.json',
                'summaries/epoch_005/summary.md', 'manifests/epoch_005/manifest.json',
                'visualizations/training_curves/epoch_005/curves.png', 'predictions/epoch_005/a.nii.gz',
                'predictions/epoch_005/b.nii.gz', 'samples/epoch_005/samples/x.png', 'samples/epoch_005/samples/sub/y.png',
                'config/epoch_005/config.json', 'logs/epoch_005/train.log', 'visualizations/attention/epoch_005/attn.png'}
    assert walk(store.client, store.run_id) == expected
    assert paths['predictions'] == ['predictions/epoch_005/a.nii.gz', 'predictions/epoch_005/b.nii.gz']
    summary = Path(store.client.download_artifacts(store.run_id, paths['summary'], str(t/'dl'))).read_text()
    assert summary.startswith('# Epoch 5 Summary\n## Metrics\n| Metric | Value |\n|--------|-------|\n| train_loss | 0.150000 |')
    assert '- **training_curves**: `/visualizations/training_curves/epoch_005/curves.png`' in summary
    assert int(summary.split('Generated at: ')[1].split('(')[1].split(' ms)')[0]) > 1.7e12 and ' UTC (' in summary  # read as UTC
    r = store.client.get_run(store.run_id)
    assert r.data.metrics['artifacts/files'] == len(expected) and r.data.metrics['artifacts/bytes'] > 1000
    assert 'artifacts/seconds' in r.data.metrics
    ck = load_checkpoint(store.client.download_artifacts(store.run_id, paths['checkpoint'], str(t/'dl')))
    assert torch.equal(ck['weight'], net().weight)


def test_metrics_and_metadata_json(store):
    meta = {'hyperparameters': {'lr': np.float32(0.5), 'api_token': 'tok-SECRET'}, 'seed': 7, 'when': datetime(2026, 1, 1),
            'shape': torch.tensor([2, 3]), 'data_dir': Path('/data')}
    with MLflowArtifactManager(store.settings, store.client) as m:
        p = m.log_epoch(1, metrics={'val_loss': float('nan'), 'hd95': float('inf'), 'x': -float('inf')}, metadata=meta, run_id=store.run_id)
    dl = store.tmp/'dl'
    strict = lambda s: json.loads(s, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    mj = strict(Path(store.client.download_artifacts(store.run_id, p['metrics'], str(dl))).read_text())
    assert mj['metrics'] == {'val_loss': 'NaN', 'hd95': 'Infinity', 'x': '-Infinity'} and mj['timestamp_ms'] > 0
    md_text = Path(store.client.download_artifacts(store.run_id, p['metadata'], str(dl))).read_text()
    md = strict(md_text)
    assert 'tok-SECRET' not in md_text and md['hyperparameters'] == {'lr': 0.5, 'api_token': '***'}
    assert (md['seed'], md['when'], md['shape'], md['data_dir']) == (7, '2026-01-01T00:00:00', [2, 3], '/data')
    assert md['software']['torch'] == torch.__version__ and md['host'] and 'git_commit' in md
    metrics = store.client.get_run(store.run_id).data.metrics
    assert math.isnan(metrics['val_loss']) and metrics['hd95'] > 1e300


def test_unsupported_metadata_is_rejected_before_anything_is_written(store):
    with MLflowArtifactManager(store.settings, store.client) as m:
        with pytest.raises(TypeError, match=r"metadata\['model'\]: cannot store a Conv3d"):
            m.log_epoch(0, metadata={'model': net()}, run_id=store.run_id)
        assert not any(m.uploader.staging.iterdir())
    assert walk(store.client, store.run_id) == set()


# ---------------------------------------------------------------- names and symlinks

BAD_NAMES = ['../evil', 'a/../../evil', '/etc/passwd', 'C:/evil', 'c:evil', 'a\\b', '%2e%2e/evil', '%2E%2E%2Fevil',
             '%252e%252e/evil', '..%2fevil', 'a#b', 'a?b', 'a;b', 'a\x00b', 'a\x1bb', 'a\tb']


@pytest.mark.parametrize('bad', BAD_NAMES)
def test_unsafe_names_are_rejected_before_any_file_is_touched(store, bad):
    good = store.tmp/'ok.txt'; good.write_text('fine')
    with MLflowArtifactManager(store.settings, store.client, async_upload=False) as m:
        with pytest.raises(ValueError, match='Unsafe'): m.log_epoch(0, artifacts={'logs': good, bad: good}, run_id=store.run_id)
        # metric names follow MLflow's key rule (layout.check_key), not the path rule: a drive letter is legal there
        if bad not in ('C:/evil', 'c:evil'):
            with pytest.raises(ValueError, match='MLflow'): m.log_epoch(0, metrics={bad: 1.0}, run_id=store.run_id)
        assert not any(m.uploader.staging.iterdir())
    assert walk(store.client, store.run_id) == set()


def test_unsafe_file_names_inside_a_folder_are_rejected(store):
    d = store.tmp/'f'; d.mkdir(); (d/'a#b.txt').write_text('x')
    with MLflowArtifactManager(store.settings, store.client) as m:
        with pytest.raises(ValueError, match="Unsafe artifact name 'a#b.txt'"): m.log_epoch(0, artifacts={'logs': d}, run_id=store.run_id)


def test_symlinks_outside_the_folder_are_not_followed(store, caplog):
    secret = store.tmp/'secret.txt'; secret.write_text('do not upload')
    d = store.tmp/'logs'; (d/'inner').mkdir(parents=True); (d/'ok.txt').write_text('ok'); (d/'inner'/'x.txt').write_text('x')
    (d/'leak.txt').symlink_to(secret); (d/'outdir').symlink_to(store.tmp); (d/'alias.txt').symlink_to(d/'ok.txt')
    with MLflowArtifactManager(store.settings, store.client) as m:
        m.log_epoch(0, artifacts={'logs': d}, run_id=store.run_id)
    files = {p for p in walk(store.client, store.run_id) if p.startswith('logs/')}
    assert files == {'logs/epoch_000/logs/ok.txt', 'logs/epoch_000/logs/inner/x.txt', 'logs/epoch_000/logs/alias.txt'}
    assert any('outside' in r.message for r in caplog.records)


def test_check_name_accepts_ordinary_names():
    for ok in ['a.png', 'case_01/pred.nii.gz', 'epoch_005', 'name with spaces.txt', 'ünïcode.json']: assert check_name(ok) == ok


# ---------------------------------------------------------------- checkpoints

def _log_scores(store, scores, **kw):
    s = load_settings(settings_file=False, environ={}, store_dir=store.tmp/'store', tracking_uri=store.settings.tracking_uri, **kw)
    with MLflowArtifactManager(s, store.client) as m:
        for e, v in enumerate(scores): m.log_epoch(e, net(e), {'val_dice': v}, run_id=store.run_id)
    return {p.split('/')[1] for p in walk(store.client, store.run_id, 'checkpoints')}


def test_best_policy_saves_improvements_and_tags_the_best(store):
    assert _log_scores(store, [0.5, 0.4, 0.6, 0.6, 0.55]) == {'epoch_000', 'epoch_002'}
    tags = store.client.get_run(store.run_id).data.tags
    assert tags[LATEST_CHECKPOINT_ARTIFACT_TAG_KEY] == 'checkpoints/epoch_002/model.pt' == tags['coronary_mlops.best_checkpoint']
    ck = load_checkpoint(store.client.download_artifacts(store.run_id, tags[LATEST_CHECKPOINT_ARTIFACT_TAG_KEY], str(store.tmp/'d')))
    assert torch.equal(ck['weight'], net(2).weight)


def test_top_k_deletes_superseded_checkpoints_from_the_store(store):
    kept = _log_scores(store, [0.5, 0.7, 0.6, 0.4, 0.8, 0.65], checkpoint_policy='top_k', top_k=2)
    assert kept == {'epoch_001', 'epoch_004'}
    rep = MLflowArtifactManager(store.settings, store.client).verify(store.run_id)
    assert rep.ok, rep


@pytest.mark.parametrize('policy,expected', [('all', 4), ('none', 0)])
def test_all_and_none_policies(store, policy, expected):
    assert len(_log_scores(store, [0.1, 0.3, 0.2, 0.4], checkpoint_policy=policy)) == expected


def test_min_mode_and_explicit_is_best(store):
    s = load_settings(settings_file=False, environ={}, store_dir=store.tmp/'store', tracking_uri=store.settings.tracking_uri,
                      monitor='val_loss', mode='min')
    with MLflowArtifactManager(s, store.client) as m:
        m.log_epoch(0, net(), {'val_loss': 1.0}, run_id=store.run_id)
        m.log_epoch(1, net(), {'val_loss': 2.0}, run_id=store.run_id)
        m.log_epoch(2, net(), {'val_loss': 3.0}, run_id=store.run_id, is_best=True)  # same weights: still a real file
    assert {p.split('/')[1] for p in walk(store.client, store.run_id, 'checkpoints')} == {'epoch_000', 'epoch_002'}


def test_a_model_state_that_needs_pickle_is_refused(store):
    with MLflowArtifactManager(store.settings, store.client) as m:
        with pytest.raises(TypeError, match='weights_only'):
            m.log_epoch(0, {'opt': torch.optim.SGD(net().parameters(), lr=0.1)}, {'val_dice': 1.0}, run_id=store.run_id)


def _save_forever(path, states, started):
    "Child: save the prepared states in turn, forever (tensors are made before the fork: no OpenMP in the child)"
    for i in range(10**9):
        atomic_torch_save(states[i % len(states)], path)
        if i == 0: started.write_text('1')


def test_kill_9_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
    path, n = tmp_path/'ck'/'model.pt', 4_000_000  # 16 MB per save
    states = [{'w': torch.full((n,), float(v))} for v in (1, 2, 3)]
    atomic_torch_save({'w': torch.zeros(n)}, path)
    ctx, mid_write, rng, started = mp.get_context('fork'), 0, random.Random(0), tmp_path/'started'
    for i in range(20):
        started.unlink(missing_ok=True)
        p = ctx.Process(target=_save_forever, args=(path, states, started)); p.start()
        t0 = time.time()
        while not started.exists():
            assert time.time() - t0 < 30 and p.is_alive(), "the saving child did not start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(p.pid, signal.SIGKILL); p.join()
        mid_write += any(path.parent.glob('.model.pt.tmp-*'))
        w = load_checkpoint(path)['w']
        assert w.shape == (n,) and bool((w == w[0]).all()) and w[0].item() in (1, 2, 3), f"kill {i}: torn checkpoint"
    assert mid_write >= 5, f"only {mid_write} of 20 kills landed mid-write; the test did not exercise the crash"
    atomic_torch_save({'w': torch.ones(3)}, path)  # the next save sweeps what the killed writers left
    assert [p.name for p in path.parent.iterdir()] == ['model.pt']


# ---------------------------------------------------------------- verification, dedup, compression

def test_verify_reports_missing_modified_and_extra(tmp_path, clean_env):
    st = make_store(tmp_path)
    f = tmp_path/'x.txt'; f.write_text('hello')
    with MLflowArtifactManager(st.settings, st.client) as m:
        for e in range(3): m.log_epoch(e, metrics={'m': e}, artifacts={'logs': f, 'config': {'e': e}}, run_id=st.run_id)
        assert m.verify(st.run_id).ok
        root = Path(st.client.get_run(st.run_id).info.artifact_uri.replace('file://', ''))
        (root/'config/epoch_001/config.json').write_text('{"e": 99}')
        (root/'metrics/epoch_002/metrics.json').unlink()
        (root/'logs/epoch_000/intruder.txt').write_text('?')
        rep = m.verify(st.run_id)
    assert rep.missing == ['metrics/epoch_002/metrics.json'] and rep.modified == ['config/epoch_001/config.json']
    # stored files: 3 epochs x (metrics, metadata, summary, config) + x.txt once (dedup); the manifests are the reference
    assert rep.extra == ['logs/epoch_000/intruder.txt'] and not rep.ok and rep.checked == 3 * 4 + 1


def test_files_hashed_while_staging_keep_the_integrity_guarantees(store, request):
    # large files start hashing while the epoch is staged: the manifest still holds the sha256 of the bytes stored,
    # a caller rewriting its file after log_epoch returns changes nothing, and verify still catches tampering
    from coronary_mlops.uploader import EARLY_HASH_BYTES
    from coronary_mlops.storage import sha256_file
    vols = [store.tmp/f'vol{i}.raw' for i in range(3)]
    for v in vols: v.write_bytes(os.urandom(EARLY_HASH_BYTES + 11))
    logged = {v.name: sha256_file(v) for v in vols}
    with MLflowArtifactManager(store.settings, store.client, compress_threshold_mb=0) as m:
        m.log_epoch(0, artifacts={'predictions': vols}, run_id=store.run_id)
        for v in vols: v.write_bytes(b'rewritten by the caller')  # at once, while the epoch is hashed and uploaded
        m.flush()
        entries = {Path(e['path']).name: e['sha256'] for e in m.manifest(store.run_id, 0)['files']}
        assert {k: entries[k] for k in logged} == logged and m.verify(store.run_id).ok
        uri = store.client.get_run(store.run_id).info.artifact_uri  # the bytes where the store keeps them
        root = (Path(uri.removeprefix('file://')) if uri.startswith('file://') else
                Path(request.getfixturevalue('server').artifacts)/uri.removeprefix('mlflow-artifacts:/'))
        assert {v.name: sha256_file(root/'predictions/epoch_000'/v.name) for v in vols} == logged
        with open(root/'predictions/epoch_000/vol1.raw', 'r+b') as f: f.seek(EARLY_HASH_BYTES); f.write(b'x')
        assert m.verify(store.run_id).modified == ['predictions/epoch_000/vol1.raw']
        assert m.uploader._hasher is not None  # the hashes did start while staging
        # two files of one name under one type would be one path: refused before anything is staged, naming both
        (store.tmp/'a').mkdir(); (store.tmp/'b').mkdir()
        (store.tmp/'a/seg.raw').write_bytes(os.urandom(EARLY_HASH_BYTES + 1))
        (store.tmp/'b/seg.raw').write_bytes(b'small')
        with pytest.raises(ValueError, match=r"predictions/epoch_001/seg.raw.*a/seg.raw and .*b/seg.raw"):
            m.log_epoch(1, artifacts={'predictions': [store.tmp/'a/seg.raw', store.tmp/'b/seg.raw']}, run_id=store.run_id)
        (store.tmp/'a/model.pt').write_bytes(b'not a checkpoint')  # named like the one model_state makes
        with pytest.raises(ValueError, match='the model_state checkpoint'):
            m.log_epoch(1, net(), artifacts={'checkpoint': store.tmp/'a/model.pt'}, run_id=store.run_id)
    assert m.uploader._hashing == 0 and m.uploader._hasher is None  # every open file given back, the threads stopped


def test_dedup_stores_a_repeated_file_once(store):
    big = store.tmp/'vol.bin'; big.write_bytes(os.urandom(5 * 2**20))
    with MLflowArtifactManager(store.settings, store.client) as m:
        for e in range(10): m.log_epoch(e, artifacts={'predictions': big}, run_id=store.run_id)
        rep = m.verify(store.run_id)
    stored = [p for p in walk(store.client, store.run_id) if p.endswith('vol.bin')]
    assert stored == ['predictions/epoch_000/vol.bin'] and rep.ok
    dedup = store.client.get_metric_history(store.run_id, 'artifacts/dedup_bytes')
    assert sum(x.value for x in dedup) == 9 * 5 * 2**20
    out = MLflowArtifactManager(store.settings, store.client).download(store.run_id, 'predictions/epoch_007/vol.bin', store.tmp/'dl')
    assert out.read_bytes() == big.read_bytes()


def test_dedup_survives_a_new_manager_on_the_same_run(store):
    f = store.tmp/'same.bin'; f.write_bytes(os.urandom(4096))
    for e in range(2):
        with MLflowArtifactManager(store.settings, store.client) as m: m.log_epoch(e, artifacts={'logs': f}, run_id=store.run_id)
    assert [p for p in walk(store.client, store.run_id) if p.endswith('same.bin')] == ['logs/epoch_000/same.bin']


def test_large_files_are_compressed_and_transparently_restored(store):
    vol = store.tmp/'pred.nii'; vol.write_bytes(bytes(3 * 2**20))  # zeros compress well
    with MLflowArtifactManager(store.settings, store.client, compress_threshold_mb=1) as m:
        m.log_epoch(2, artifacts={'predictions': vol}, run_id=store.run_id)
        assert m.verify(store.run_id).ok
        out = m.download(store.run_id, 'predictions/epoch_002/pred.nii', store.tmp/'dl')
    assert 'predictions/epoch_002/pred.nii.gz' in walk(store.client, store.run_id)
    assert out.name == 'pred.nii' and out.read_bytes() == vol.read_bytes()
    assert store.client.get_run(store.run_id).data.metrics['artifacts/bytes'] < 1e6



def test_a_repeated_compressed_file_downloads_as_logged(store):
    "Dedup of a gzipped file: later epochs point at the first epoch's .gz, and still download the logged bytes"
    log = store.tmp/'train.log'; log.write_text('loss 0.5\n' * 300_000)
    with MLflowArtifactManager(store.settings, store.client, compress_threshold_mb=1) as m:
        for e in range(3): m.log_epoch(e, artifacts={'logs': log}, run_id=store.run_id)
        m.flush()
        for e in range(3): assert m.download(store.run_id, f'logs/epoch_{e:03d}/train.log', store.tmp/f'dl{e}').read_bytes() == log.read_bytes()
        assert m.verify(store.run_id).ok
    assert [p for p in walk(store.client, store.run_id) if 'train.log' in p] == ['logs/epoch_000/train.log.gz']
    # and from a new manager, which rebuilds its dedup index from the manifests
    with MLflowArtifactManager(store.settings, store.client, compress_threshold_mb=1) as m:
        m.log_epoch(3, artifacts={'logs': log}, run_id=store.run_id)
        m.flush()
        assert m.download(store.run_id, 'logs/epoch_003/train.log', store.tmp/'dl3').read_bytes() == log.read_bytes()


def test_a_logged_gz_file_comes_back_as_gzip_with_its_content(store):
    "MLflow's S3 store tags *.gz objects Content-Encoding: gzip and SeaweedFS serves them decoded; the kit restores them"
    vol = np.zeros((20, 20, 10), np.uint8); vol[5:15, 5:15, 3:7] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), store.tmp/'pred.nii.gz')
    with MLflowArtifactManager(store.settings, store.client) as m:
        m.log_epoch(0, artifacts={'predictions': store.tmp/'pred.nii.gz'}, run_id=store.run_id)
        m.flush()
        out = m.download(store.run_id, 'predictions/epoch_000/pred.nii.gz', store.tmp/'dl')
        assert m.verify(store.run_id).ok
    assert np.array_equal(np.asarray(nib.load(out).dataobj), vol)
    assert gzip.decompress(out.read_bytes()) == gzip.decompress((store.tmp/'pred.nii.gz').read_bytes())
    # a stored copy changed after logging is caught on download, not handed over
    root = store.client.get_run(store.run_id).info.artifact_uri
    if root.startswith('file://'):
        (Path(root[7:])/'predictions/epoch_000/pred.nii.gz').write_bytes(gzip.compress(b'tampered'))
        with pytest.raises(ArtifactIntegrityError, match='does not match the sha256'):
            MLflowArtifactManager(store.settings, store.client).download(store.run_id, 'predictions/epoch_000/pred.nii.gz', store.tmp/'dl2')

# ---------------------------------------------------------------- non-blocking, errors, fallback

def test_context_manager_flushes_and_cleans_up_on_exception(store):
    with pytest.raises(RuntimeError, match='boom'):
        with MLflowArtifactManager(store.settings, store.client) as m:
            m.log_epoch(0, metrics={'a': 1.0}, run_id=store.run_id)
            raise RuntimeError('boom')
    assert 'metrics/epoch_000/metrics.json' in walk(store.client, store.run_id)
    assert not m.uploader.staging.exists()


def test_errors_surface_on_flush_when_nothing_can_be_kept(tmp_path, clean_env, caplog):
    srv = MlflowServer(tmp_path/'srv').start()
    st = make_store(tmp_path, srv.uri)
    srv.stop()
    m = MLflowArtifactManager(st.settings, st.client, retries=2, backoff=0.05)
    m.uploader.spool_dir = tmp_path/'not-a-dir'; m.uploader.spool_dir.write_text('a file where the spool should be')
    m.log_epoch(0, metrics={'a': 1.0}, run_id=st.run_id)
    with pytest.raises(ArtifactUploadError, match='nor spooled'): m.flush()
    m.close()


def test_killed_server_mid_run_then_replay_brings_everything_back(tmp_path, clean_env, caplog):
    srv = MlflowServer(tmp_path/'srv').start()
    try:
        st = make_store(tmp_path, srv.uri)
        f = tmp_path/'curve.png'; f.write_bytes(b'\x89PNG' + os.urandom(1000))
        m = MLflowArtifactManager(st.settings, st.client, retries=2, backoff=0.05)
        m.log_epoch(0, net(0), {'val_dice': 0.5}, artifacts={'training_curves': f}, run_id=st.run_id); m.flush()
        srv.stop()
        with caplog.at_level(logging.WARNING, 'coronary_mlops.artifacts'):
            t0 = time.perf_counter()
            paths = m.log_epoch(1, net(1), {'val_dice': 0.6}, artifacts={'training_curves': f}, run_id=st.run_id)
            returned_in = time.perf_counter() - t0
            m.log_epoch(2, net(2), {'val_dice': 0.7}, artifacts={'training_curves': f}, run_id=st.run_id)
            m.flush()
        assert returned_in < 1.0 and paths['checkpoint'] == 'checkpoints/epoch_001/model.pt'
        spooled = m.spooled(st.run_id)
        assert len(spooled) == 2 and sum('spooled it to' in r.message for r in caplog.records) == 2
        srv.start()
        assert m.replay_spool(st.run_id) == 2 and m.spooled() == []
        assert m.verify(st.run_id).ok
        hist = st.client.get_metric_history(st.run_id, 'val_dice')
        assert [(h.step, h.value) for h in hist] == [(0, 0.5), (1, 0.6), (2, 0.7)]
        assert st.client.get_run(st.run_id).data.tags['coronary_mlops.best_epoch'] == '2'
        m.close()
    finally: srv.stop()


def test_orphaned_staging_of_a_dead_process_is_recovered(tmp_path, clean_env):
    st = make_store(tmp_path)
    code = f"""
import os, sys
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
s = load_settings(settings_file=False, environ={{}}, store_dir={str(tmp_path/'store')!r})
m = MLflowArtifactManager(s, async_upload=True)
m.uploader._submit = lambda *a: None   # the process dies before its worker uploads anything
m.log_epoch(4, metrics={{'a': 1.0}}, run_id={st.run_id!r})
os._exit(0)
"""
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
    m = MLflowArtifactManager(st.settings, st.client)
    assert len(m.spooled(st.run_id)) == 1 and m.replay_spool() == 1
    assert 'metrics/epoch_004/metrics.json' in walk(st.client, st.run_id)
    m.close()


def test_disk_full_while_staging_loses_nothing_already_logged(tmp_path, clean_env):
    small = tmp_path/'small'; small.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a size-limited tmpfs here")
    try:
        st = make_store(tmp_path)
        ok, big = tmp_path/'ok.bin', tmp_path/'big.bin'
        ok.write_bytes(os.urandom(1000)); big.write_bytes(os.urandom(3 * 2**20))
        with MLflowArtifactManager(st.settings, st.client, workdir=small) as m:
            m.log_epoch(0, metrics={'a': 1.0}, artifacts={'logs': ok}, run_id=st.run_id); m.flush()
            with pytest.raises(OSError, match=r'Could not stage epoch 1 of run .*No space left'):
                m.log_epoch(1, metrics={'a': 2.0}, artifacts={'logs': big}, run_id=st.run_id)
            assert not any(m.uploader.staging.iterdir())
            m.log_epoch(2, metrics={'a': 3.0}, artifacts={'logs': ok}, run_id=st.run_id)
            assert m.verify(st.run_id).ok
        assert [h.step for h in st.client.get_metric_history(st.run_id, 'a')] == [0, 2]
    finally: subprocess.run(['umount', '-l', str(small)])


# ---------------------------------------------------------------- concurrency, memory, public functions

def test_two_threads_log_into_one_run(store):
    with MLflowArtifactManager(store.settings, store.client) as m:
        def go(start):
            for e in range(start, 20, 2):
                f = store.tmp/f'log{e}.txt'; f.write_text(f'epoch {e}')
                m.log_epoch(e, metrics={'m': e}, artifacts={'logs': f}, run_id=store.run_id)
        ts = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
        [t.start() for t in ts]; [t.join() for t in ts]
        rep = m.verify(store.run_id)
    assert rep.ok
    logs = {p for p in walk(store.client, store.run_id) if p.startswith('logs/')}
    assert logs == {f'logs/epoch_{e:03d}/log{e}.txt' for e in range(20)}
    assert sorted(h.step for h in store.client.get_metric_history(store.run_id, 'm')) == list(range(20))


def test_two_processes_log_into_one_run(tmp_path, clean_env, server):
    st = make_store(tmp_path, server.uri)
    code = """
import sys
from datetime import datetime
from pathlib import Path
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
start, run_id, uri, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
s = load_settings(settings_file=False, environ={}, tracking_uri=uri, store_dir=tmp/f'w{start}')
with MLflowArtifactManager(s) as m:
    for e in range(start, 12, 2):
        f = tmp/f'p{e}.txt'; f.write_text(f'epoch {e}')
        m.log_epoch(e, metrics={'m': e}, artifacts={'logs': f}, run_id=run_id)
"""
    procs = [subprocess.Popen([sys.executable, '-c', code, str(i), st.run_id, server.uri, str(tmp_path)]) for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    logs = {p for p in walk(st.client, st.run_id) if p.startswith('logs/')}
    assert logs == {f'logs/epoch_{e:03d}/p{e}.txt' for e in range(12)}
    assert MLflowArtifactManager(st.settings, st.client).verify(st.run_id).ok


def test_logging_a_1gb_file_keeps_memory_flat(tmp_path, clean_env):
    st = make_store(tmp_path)
    code = f"""
import os, resource
from datetime import datetime
from pathlib import Path
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
s = load_settings(settings_file=False, environ={{}}, store_dir={str(tmp_path/'store')!r})
big = Path({str(tmp_path/'big.bin')!r})
with open(big, 'wb') as f:
    for _ in range(1024): f.write(os.urandom(1 << 20))
m = MLflowArtifactManager(s)
small = Path({str(tmp_path/'small.bin')!r}); small.write_bytes(b'x' * 1000)
m.log_epoch(0, artifacts={{'logs': small}}, run_id={st.run_id!r}); m.flush()  # warm up imports and the store
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m.log_epoch(1, artifacts={{'predictions': big}}, run_id={st.run_id!r}); m.flush()
rep = m.verify({st.run_id!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, rep.ok)
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, timeout=600).stdout.split()
    assert out[1] == 'True' and int(out[0]) < 64, f"peak RSS grew by {out[0]} MB"


def test_module_functions_use_the_active_run(tmp_path, clean_env):
    import mlflow
    s = load_settings(settings_file=False, environ={}, store_dir=tmp_path/'store')
    mlflow.set_tracking_uri(s.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=get_or_create_experiment(s)) as r:
            p = A.log_epoch_artifacts(3, net(), {'val_dice': 0.9}, artifacts={'config': {'a': 1}}, settings=s)
            A.flush(s)
        assert p['checkpoint'] == 'checkpoints/epoch_003/model.pt'
        assert A.verify_run_artifacts(r.info.run_id, settings=s).ok
        model_dir = tmp_path/'final'; model_dir.mkdir()
        torch.save(net().state_dict(), model_dir/'weights.pt'); (model_dir/'config.json').write_text('{"channels": [8]}')
        out = A.log_final_model({'arch': 'UNet', 'token': 'SECRET'}, model_dir, {'val_dice': 0.9}, run_id=r.info.run_id, settings=s)
        files = walk(s.client(), r.info.run_id, 'model')
        assert files == {'model/weights/weights.pt', 'model/config/config.json', 'model/summary/model_info.json',
                         'model/summary/best_metrics.json', 'model/summary/summary.md'} == set(out['weights'] + out['config'] + out['summary'])
        info = Path(s.client().download_artifacts(r.info.run_id, 'model/summary/model_info.json', str(tmp_path/'d'))).read_text()
        assert 'SECRET' not in info
        with pytest.raises(ValueError, match='No run'): A.log_epoch_artifacts(0, metrics={'a': 1}, settings=s)
    finally: mlflow.set_tracking_uri(None) if hasattr(mlflow, 'set_tracking_uri') else None


def test_training_and_prediction_helpers_file_under_the_layout(tmp_path, clean_env):
    import nibabel as nib
    st = make_store(tmp_path)
    log = tmp_path/'train.log'; log.write_text('ok\n')
    fig, ax = plt.subplots(); ax.plot([1, 2])
    with MLflowArtifactManager(st.settings, st.client) as m:
        p = m.log_training_artifacts(4, curves=fig, logs=log, config={'a': 1}, run_id=st.run_id)
        q = m.log_prediction_artifacts(4, {'case_7': torch.ones(4, 4, 2)}, sample_images=log, run_id=st.run_id)
    assert (p['training_curves'], p['logs'], p['config']) == ('visualizations/training_curves/epoch_004/curves.png',
                                                              'logs/epoch_004/train.log', 'config/epoch_004/config.json')
    assert (q['predictions'], q['sample_images']) == ('predictions/epoch_004/case_7.nii.gz', 'samples/epoch_004/train.log')
    vol = nib.load(st.client.download_artifacts(st.run_id, q['predictions'], str(tmp_path/'d')))
    assert vol.shape == (4, 4, 2) and float(np.asarray(vol.dataobj).sum()) == 32
    with MLflowArtifactManager(st.settings, st.client) as m, pytest.raises(ValueError, match='Unsafe case name'):
        m.log_prediction_artifacts(5, {'../x': torch.ones(2)}, run_id=st.run_id)
