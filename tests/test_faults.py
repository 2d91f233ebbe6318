"""Nothing lost, round 3 (issue 26, part): torn spool files, clock steps, colliding long names, symlinks out of a
logged folder, two syncs at once, and records the store refused sent again. Real stores: SQLite and `mlflow server`."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
from servers import FaultProxy, MlflowServer, free_port
from conftest import points, sync

pytestmark = pytest.mark.server
CLI = str(Path(sys.executable).parent/'coronary-mlops')


@pytest.fixture
def offline(tmp_path, clean_env):
    "(settings of a client whose server is down, the server to start later on that port)"
    port = free_port()
    s = load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=f"http://127.0.0.1:{port}",
                      experiment_name='faults')
    return s, MlflowServer(tmp_path/'srv', port=port)


def search(s, **tags):
    tr = MLflowTracker(settings=s)
    out = {r.tags['coronary_mlops.offline_id']: r for r in tr.search_runs('faults')}
    tr.close()
    return out


def test_a_torn_line_in_one_runs_spool_blocks_no_other_run_and_sync_says_so(offline):
    s, srv = offline
    tr = MLflowTracker(settings=s)
    r = tr.start_run(run_name='R').run_id
    for step in range(30): tr.log_metric('loss', step / 10, step=step)
    tr.end_run()
    sr = tr.start_run(run_name='S').run_id
    for step in range(30): tr.log_metric('loss', step, step=step)
    tr.flush(raise_errors=False)
    [seg] = [f for f in tr.queue.spooled_segments(r) if 'loss' in f.read_text()][-1:]
    text = seg.read_text().splitlines()
    seg.write_text('\n'.join(text[:-2] + [text[-2][:17]] + text[-1:]) + '\n')  # one line of R torn in the middle
    srv.start()
    try:
        tr.end_run()  # S: raises nothing, though R's segment is torn
        assert tr.flush() is True
        tr.close()
        runs = search(s)
        client = MLflowTracker(settings=s).client
        assert runs[sr].status == 'FINISHED' and points(client, runs[sr].run_id, 'loss') == [(i, i) for i in range(30)]
        got = points(client, runs[r].run_id, 'loss')
        assert len(got) == 29 and runs[r].status == 'FINISHED'  # every readable record of R too
        [torn] = list((Path(s.store_dir)/'tracker_spool'/'rejected').glob('*.torn'))
        assert json.loads(torn.read_text())['line'] == len(text) - 1
        p = subprocess.run([CLI, '--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync'],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and '1 set aside' in p.stdout and torn.name in p.stdout and 'Traceback' not in p.stderr
    finally: srv.stop()


def test_a_clock_stepped_back_between_offline_segments_changes_no_order(offline, monkeypatch, capsys):
    "Segments once were named by time.time_ns(): an hour back put a run's records before the record creating it"
    s, srv = offline
    real = time.time_ns
    tr = MLflowTracker(settings=s)
    run = tr.start_run(run_name='clock').run_id
    for step in range(3):
        for k in range(18): tr.log_metric('loss', step * 100 + k, step=step * 100 + k)
        tr.flush(raise_errors=False)  # one segment per round
        monkeypatch.setattr(time, 'time_ns', lambda: real() - 3600 * 10**9 * (step + 1))  # stepped back, again
    monkeypatch.setattr(time, 'time_ns', real)
    tr.end_run(); tr.close()
    srv.start()
    try:
        rc, out = sync(s, capsys=capsys)
        assert rc == 0, out
        info = search(s)[run]
        assert info.status == 'FINISHED'
        assert len(points(MLflowTracker(settings=s).client, info.run_id, 'loss')) == 54
    finally: srv.stop()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0))
def test_a_spool_segment_cut_anywhere_replays_what_it_holds_and_sets_aside_the_rest(tmp_path_factory, cut):
    tmp = tmp_path_factory.mktemp('cut')
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp/'store'), experiment_name='cut'))
    run = tr.client.create_run(tr.experiment_id).info.run_id
    recs = [(run, 'm', 'loss', float(i), i, 1_700_000_000_000 + i) for i in range(12)]
    tr.queue.spool_write(recs)
    [seg] = tr.queue.spooled_segments(run)
    data = seg.read_bytes(); seg.write_bytes(data[:int(cut * len(data))])
    *lines, last = data[:int(cut * len(data))].split(b'\n')
    whole = len(lines) + (bool(last) and last == data.split(b'\n')[len(lines)])  # a line cut only of its newline is whole
    partial = int(bool(last) and whole == len(lines))
    tr.queue.replay()  # raises nothing
    assert points(tr.client, run, 'loss') == [(i, float(i)) for i in range(whole)]
    assert len(list((tr.spool_dir/'rejected').glob('*.torn'))) == partial and not tr.queue.spooled_segments()
    tr.close()


def test_long_params_and_tags_whose_names_differ_only_in_punctuation_keep_every_value(tmp_path, clean_env):
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'store'), experiment_name='long'))
    keys = ('aug:rot', 'aug rot', 'aug_rot')
    with tr.start_run() as run:
        tr.log_params({k: f"{k}=" + 'x' * 7000 for k in keys})
        tr.set_tags({k: f"{k}=" + 'y' * 9000 for k in keys})
    info = tr.client.get_run(run.run_id).data
    files = {info.params[k].split()[1] for k in keys} | {info.tags[k].split()[1] for k in keys}
    assert len(files) == 6
    for k in keys:
        for kind in ('params', 'tags'):
            f = (info.params if kind == 'params' else info.tags)[k].split()[1]
            assert Path(tr.client.download_artifacts(run.run_id, f, str(tmp_path/'dl'))).read_text().startswith(f"{k}=")
    tr.close()


@pytest.mark.parametrize('online', [True, False])
def test_log_artifacts_does_not_follow_a_symlink_out_of_the_folder(tmp_path, clean_env, online):
    secret = tmp_path/'credentials'; secret.write_text('aws_secret_access_key = hunter2')
    out = tmp_path/'outputs'; (out/'sub').mkdir(parents=True)
    (out/'report.txt').write_text('ok'); (out/'sub'/'b.txt').write_text('b'); (out/'creds').symlink_to(secret)
    uri = None if online else f"http://127.0.0.1:{free_port()}"  # nothing listens: the folder is spooled
    s = load_settings(False, store_dir=str(tmp_path/'store'), experiment_name='links',
                      **({'tracking_uri': uri} if uri else {}))
    tr = MLflowTracker(settings=s)
    with tr.start_run() as run:
        tr.log_artifacts(out, 'outputs')
    if online:
        names = sorted(f.path for f in tr.client.list_artifacts(run.run_id, 'outputs'))
        assert names == ['outputs/report.txt', 'outputs/sub']
    spooled = [p for p in Path(s.store_dir).rglob('*') if p.is_file() and 'hunter2' in p.read_text(errors='ignore')]
    assert spooled == []
    if not online:
        copies = [p.name for p in (Path(s.store_dir)/'tracker_spool').rglob('*') if p.is_file() and 'files' in p.parts]
        assert sorted(copies) == ['b.txt', 'report.txt']
    tr.close()


def test_two_syncs_at_once_are_safe_and_the_second_waits(offline):
    s, srv = offline
    tr = MLflowTracker(settings=s)
    runs = []
    for i in range(3):
        with tr.start_run(run_name=f'r{i}') as run:
            for step in range(500): tr.log_metric('loss', step + i, step=step)
            runs.append(run.local_id if hasattr(run, 'local_id') else run.run_id)
        tr.flush(raise_errors=False)
    tr.close()
    srv.start()
    try:
        cmd = [CLI, '--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync']
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in ps]
        assert [p.returncode for p in ps] == [0, 0], outs
        assert not any('Traceback' in e for _, e in outs)
        found = search(s)
        assert sorted(found) == sorted(runs)  # each offline run created once
        client = MLflowTracker(settings=s).client
        for i, local in enumerate(sorted(runs)):
            assert len(points(client, found[local].run_id, 'loss')) == 500
    finally: srv.stop()


def test_records_the_store_refused_are_sent_again_with_retry_rejected(tmp_path, clean_env, capsys):
    "A run deleted while it was logged to: its records are set aside; restored, `sync --retry-rejected` sends them"
    s = load_settings(False, store_dir=str(tmp_path/'store'), experiment_name='retry')
    tr = MLflowTracker(settings=s)
    run = tr.client.create_run(tr.experiment_id).info.run_id
    tr.client.delete_run(run)
    for step in range(5): tr.log_metric('loss', step, step=step, run_id=run)
    deadline = time.monotonic() + 60  # under load SQLite may first answer 'database is locked': a retry, not a refusal
    while not tr.flush(raise_errors=False) and time.monotonic() < deadline: time.sleep(0.2)
    assert tr.pending == 0 and len(tr.queue.set_aside()) == 1
    tr.close()
    rc, out = sync(s, capsys=capsys)
    assert rc == 1 and '1 set aside' in out.out  # the truth: something is set aside
    MLflowTracker(settings=s).client.restore_run(run)
    for _ in range(2):  # twice: the second finds nothing more to send
        rc, out = sync(s, '--retry-rejected', capsys=capsys)
        assert rc == 0 and '0 set aside' in out.out, out
    assert points(MLflowTracker(settings=s).client, run, 'loss') == [(i, float(i)) for i in range(5)]


def test_a_full_disk_under_the_store_is_a_named_error_not_a_sigbus_and_logging_goes_on_once_there_is_room(small_disk, clean_env):
    "The slab was a sparse file mapped into memory: on a full disk the process died of SIGBUS, with no message"
    code = f"""
import torch, sys
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
s = load_settings(False, store_dir={str(small_disk/'store')!r}, tracking_uri='sqlite:///{clean_env}/meta.db',
                  experiment_name='full')
m = MLflowArtifactManager(s)
rid = s.client().create_run(m.experiment_id if hasattr(m, 'experiment_id') else
                            s.client().create_experiment('full')).info.run_id
big = {{'w': torch.ones(3_000_000)}}  # 12 MB: more than the disk holds
try: m.log_epoch(0, big, {{'val_dice': 0.5}}, run_id=rid)
except OSError as e: print('REFUSED', e)
m.log_epoch(1, {{'w': torch.ones(10)}}, {{'val_dice': 0.6}}, run_id=rid); m.flush()
print('EPOCHS', m.epochs(rid)); m.close()
"""
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])  # alive: -7 was SIGBUS
    out = p.stdout
    assert 'REFUSED' in out and f"{small_disk/'store'}" in out and 'is full' in out and 'needs 11.4 MB' in out, out
    assert 'EPOCHS [1]' in out


def test_a_full_spool_disk_keeps_the_records_in_memory_and_flush_says_so(small_disk, offline):
    s0, srv = offline
    s = load_settings(False, store_dir=str(small_disk/'store'), tracking_uri=s0.tracking_uri, experiment_name='faults')
    tr = MLflowTracker(settings=s)
    filler = small_disk/'filler'
    with tr.start_run(run_name='full') as run:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # the disk fills up
        try:
            while True: os.write(fd, b'\0' * 2**16)
        except OSError: pass
        finally: os.close(fd)
        for step in range(201): tr.log_metric('loss', step, step=step)
        from coronary_mlops.tracker import TrackerError
        with pytest.raises(TrackerError, match=r'could be neither sent nor spooled.*is full'): tr.flush()
        assert len(tr.queue.buf) >= 201  # nothing dropped: in memory
        filler.unlink()  # room again
        tr.flush(raise_errors=False)
        assert not tr.queue.buf and tr.pending >= 201  # spooled now
    tr.close()
    srv.start()
    try:
        p = subprocess.run([CLI, '--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync'],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr[-2000:]
        info = search(s)[run.local_id]
        assert info.status == 'FINISHED' and len(points(MLflowTracker(settings=s).client, info.run_id, 'loss')) == 201
    finally: srv.stop()


def test_a_read_only_store_is_one_line_before_any_run(small_disk, capsys):
    from coronary_mlops.cli import main
    store = small_disk/'store'; store.mkdir()
    assert subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], capture_output=True).returncode == 0
    rc = main(['--store-dir', str(store), 'train', '--synthetic', '3', '--epochs', '1', '--roi', '16'])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and 'read-only file system' in err and str(store) in err, err
    assert list(store.iterdir()) == []  # no database, no run


def _spool_epochs(s, n=3):
    "An offline run with `n` epochs spooled, each the best so far; (its local id, the epoch folders in the spool)"
    import torch
    tr = MLflowTracker(settings=s)
    with tr.start_run(run_name='epochs') as run:
        for e in range(n):
            tr.log_epoch(e, model_state={'w': torch.full((4,), float(e))}, metrics={'val_dice': 0.5 + 0.1 * e},
                         is_best=True)
        tr.artifacts.flush()
    tr.close()
    spool = Path(s.store_dir)/'spool'
    return run.local_id, sorted(d for d in spool.iterdir() if (d/'job.json').exists())


def test_a_torn_job_json_is_set_aside_alone_and_blocks_neither_a_start_nor_later_epochs(offline):
    s, srv = offline
    local, jobs = _spool_epochs(s)
    (jobs[1]/'job.json').write_text((jobs[1]/'job.json').read_text()[:40])  # epoch 1 torn
    dead = Path(s.store_dir)/'staging'/'999999-deadbeef'/'x-000-00000000'; dead.mkdir(parents=True)
    (dead/'job.json').write_text('{"run_id": "x", "epo')  # a dead process's torn staging
    srv.start()
    try:
        p = subprocess.run([CLI, '--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync'],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and 'Traceback' not in p.stderr and 'refused' not in p.stderr, p.stderr[-2000:]
        assert '2 set aside' in p.stdout and f"{jobs[1].name}.torn" in p.stdout, p.stdout
        info = search(s)[local]
        from coronary_mlops.artifacts import MLflowArtifactManager
        m = MLflowArtifactManager(s)
        assert m.epochs(info.run_id) == [0, 2]
        m.close()
    finally: srv.stop()


def test_spooled_epochs_replay_in_epoch_order_whatever_their_clock(offline, capsys):
    "Replay went by folder mtime: a clock stepped back between epochs left the best-epoch tag on a worse epoch"
    s, srv = offline
    local, jobs = _spool_epochs(s)
    for i, j in enumerate(jobs): os.utime(j, (time.time() - 3600 * i,) * 2)  # later epochs look older
    srv.start()
    try:
        rc, out = sync(s, capsys=capsys)
        assert rc == 0, out
        info = search(s)[local]
        assert info.tags['coronary_mlops.best_epoch'] == '2'
        assert info.tags['coronary_mlops.best_checkpoint'] == 'checkpoints/epoch_002/model.pt'
    finally: srv.stop()


def test_spool_files_that_are_json_of_the_wrong_shape_are_set_aside_too(tmp_path, clean_env):
    "A second break-it round: `[run, 'm', 1]` crashed every sync with IndexError; a `job.json` of `[]` blocked epochs"
    from coronary_mlops.uploader import read_job
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'store'), experiment_name='shape'))
    run = tr.client.create_run(tr.experiment_id).info.run_id
    tr.queue.spool_write([(run, 'm', 'loss', float(i), i, 1_700_000_000_000 + i) for i in range(3)])
    [seg] = tr.queue.spooled_segments(run)
    seg.write_text(seg.read_text() + json.dumps([run, 'm', 1]) + '\n' + json.dumps({'run': run}) + '\n')
    tr.queue.replay()  # raises nothing
    assert points(tr.client, run, 'loss') == [(i, float(i)) for i in range(3)]
    [torn] = list((tr.spool_dir/'rejected').glob('*.torn'))
    assert [json.loads(l)['line'] for l in torn.read_text().splitlines()] == [4, 5]
    tr.close()
    job = tmp_path/'spool'/'r-001-abc'; job.mkdir(parents=True); (job/'job.json').write_text('[]')
    assert read_job(job, tmp_path/'spool') is None and (tmp_path/'spool'/'rejected'/'r-001-abc.torn').exists()


def test_a_server_that_answers_health_but_hangs_counts_as_down_and_every_deadline_holds(tmp_path, clean_env, capsys):
    "MLflow retries a hung call 7 times with 120 s each: end_run(timeout=60) was still blocked at 7 minutes"
    with MlflowServer(tmp_path/'srv') as srv, FaultProxy(srv.uri) as px:
        s = load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=px.uri, experiment_name='wedged')
        tr = MLflowTracker(settings=s, call_timeout=3)
        run = tr.start_run(run_name='live').run_id
        tr.log_metric('loss', 0.0, step=0)
        assert tr.flush() is True
        px.armed.set()
        for step in range(1, 101): tr.log_metric('loss', float(step), step=step)
        t0 = time.monotonic(); done = tr.end_run(timeout=5); took = time.monotonic() - t0
        assert done is False and took < 6.5, took
        t0 = time.monotonic(); tr.close(timeout=5); took = time.monotonic() - t0
        assert took < 6.5 and tr.pending == 101 and px.held >= 1, (took, tr.pending)  # 100 points and the status
        tr2 = MLflowTracker(settings=s, call_timeout=3)
        t0 = time.monotonic(); late = tr2.start_run(run_name='during').run_id; took = time.monotonic() - t0
        assert late.startswith('offline-') and took < 6.5, took  # /health answers, the API does not: down
        tr2.log_metric('x', 1.0, step=0); tr2.close(timeout=5)
        px.release()
        rc, out = sync(s, capsys=capsys)
        assert rc == 0, out
        client = MLflowTracker(settings=s).client
        assert points(client, run, 'loss') == [(i, float(i)) for i in range(101)]
        assert client.get_run(run).info.status == 'FINISHED'
        [during] = client.search_runs([client.get_experiment_by_name('wedged').experiment_id], "tags.mlflow.runName = 'during'")
        assert points(client, during.info.run_id, 'x') == [(0, 1.0)]


def test_a_disk_that_fills_while_the_worker_writes_a_checkpoint_keeps_the_epoch_until_there_is_room(small_disk, clean_env, caplog):
    "torch said 'unexpected pos 768 vs 662', close() deleted the staged epoch, and sync exited 0: the epoch was gone"
    import shutil, torch
    from coronary_mlops.artifacts import MLflowArtifactManager
    s = load_settings(False, store_dir=str(small_disk/'store'), tracking_uri=f'sqlite:///{clean_env}/meta.db',
                      experiment_name='full')
    m = MLflowArtifactManager(s, async_upload=True)
    rid = s.client().create_run(s.client().create_experiment('full')).info.run_id
    w0, w1 = {'w': torch.rand(300_000)}, {'w': torch.rand(300_000)}  # 1.2 MB each
    m.log_epoch(0, w0, {'val_dice': 0.5}, run_id=rid); m.flush()
    filler = small_disk/'filler'
    filler.write_bytes(b'\0' * (shutil.disk_usage(small_disk).free - 200_000))  # room for the small files only
    m.log_epoch(1, w1, {'val_dice': 0.6}, run_id=rid)
    m.flush()  # raises nothing: the epoch is kept, not lost
    assert 'is full' in caplog.text and 'waits in' in caplog.text, caplog.text
    assert m.epochs(rid) == [0] and len(list((small_disk/'store'/'spool').glob(f'{rid}-001-*/snapshot.bin'))) == 1
    m.close()  # removes the staging folder: the parked epoch is not in it
    filler.unlink()  # room again
    m2 = MLflowArtifactManager(s)
    assert m2.replay_spool() == 1 and m2.epochs(rid) == [0, 1] and m2.verify(rid).ok
    assert torch.equal(m2.best_checkpoint(rid)['w'], w1['w'])
    assert [p.value for p in s.client().get_metric_history(rid, 'val_dice')] == [0.5, 0.6]
    assert not list((small_disk/'store'/'spool').glob(f'{rid}-*')); m2.close()


def test_a_spooled_epoch_folder_without_its_job_json_is_set_aside_and_sync_says_so(offline, capsys):
    "Such a folder was never replayed nor reported: sync said 0 epochs wait"
    s, srv = offline
    bare = Path(s.store_dir)/'spool'/'0123abcd-004-deadbeef'
    (bare/'tree').mkdir(parents=True); (bare/'tree'/'model.pt').write_bytes(b'weights')
    srv.start()
    try:
        rc, out = sync(s, capsys=capsys)
        aside = Path(s.store_dir)/'spool'/'rejected'/'0123abcd-004-deadbeef.torn'
        assert rc == 1 and aside.is_dir() and not bare.exists() and str(aside) in out.out, out
        assert (aside/'tree'/'model.pt').read_bytes() == b'weights'  # kept, not deleted
    finally: srv.stop()
