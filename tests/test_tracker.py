"MLflowTracker and the registry helpers on the embedded store and on a real PostgreSQL + S3 server stack"
import json, logging, subprocess, sys, textwrap, time
from pathlib import Path
import mlflow, pytest, requests, torch
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker, ParamConflictError, TrackerError, TrackerPermissionError, RunInfo
from coronary_mlops import registry
from servers import free_port
from conftest import log_tiny_model, stack_server

pytestmark = pytest.mark.server


def test_seed_workflow(store, tmp_path):
    "Experiment, run with status, params, metrics, artifacts, register, stages by aliases, run info and best run"
    tr = MLflowTracker(settings=store, experiment_tags={'project': 'coronary'})
    exp = tr.client.get_experiment(tr.experiment_id)
    assert exp.name == store.experiment_name and exp.tags['project'] == 'coronary'
    assert MLflowTracker(settings=store).experiment_id == tr.experiment_id  # fetched, not created twice
    (tmp_path/'cfg.json').write_text('{"roi": [64, 64, 64]}')
    ids = {}
    for name, dice in (('a', 0.72), ('b', 0.88), ('c', 0.81)):
        with tr.start_run(run_name=name, tags={'sweep': 's1'}) as run:
            tr.log_params({'model': {'channels': [16, 32], 'dropout': 0.1}, 'lr': 3e-4})
            for step in range(50): tr.log_metrics({'train/loss': 1 / (step + 1), 'val_dice': dice * step / 49}, step=step)
            tr.log_artifact(tmp_path/'cfg.json', 'config')
            log_tiny_model()
        ids[name] = run.run_id
    info = tr.get_run_info(ids['b'])
    assert isinstance(info, RunInfo) and info.status == 'FINISHED' and info.run_name == 'b'
    assert info.params == {'model.channels': '[16,32]', 'model.dropout': '0.1', 'lr': '0.0003'}
    assert info.metrics['val_dice'] == pytest.approx(0.88) and info.end_time >= info.start_time
    assert info.tags['sweep'] == 's1' and info.artifact_uri
    assert '| status | **FINISHED** |' in info._repr_markdown_()
    assert [m.step for m in tr.client.get_metric_history(ids['b'], 'train/loss')] == list(range(50))
    assert [f.path for f in registry.list_artifacts(ids['b'], 'config', tracker=tr)] == ['config/cfg.json']
    best = tr.get_best_run('val_dice', mode='max')
    assert best.run_id == ids['b']
    assert tr.get_best_run('train/loss', mode='min').metrics['train/loss'] == pytest.approx(1 / 50)
    mv = registry.register_model(best.run_id, tracker=tr, alias='challenger')
    assert mv.name == registry.model_name(store.experiment_name, settings=store) and mv.aliases == ['challenger']
    mv2 = registry.register_model(ids['c'], tracker=tr)
    registry.set_stage(mv.name, mv.version, 'Production', tracker=tr)
    registry.set_stage(mv.name, mv2.version, 'Staging', tracker=tr)
    assert registry.get_version(mv.name, 'champion', tracker=tr).run_id == ids['b']
    assert registry.get_version(mv.name, 'challenger', tracker=tr).run_id == ids['c']
    registry.set_stage(mv.name, mv2.version, 'Production', tracker=tr)  # moving champion moves it off v1
    v1 = tr.client.get_model_version(mv.name, mv.version)
    assert v1.aliases == [] and v1.tags['stage'] == 'Production'
    assert tr.client.get_model_version(mv.name, mv2.version).current_stage == 'None'  # the stage API was never called
    out = mlflow.pytorch.load_model(registry.model_uri(mv.name, 'champion'))
    assert out(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    if store.tracking_uri.startswith('http'):
        url = registry.ui_url(ids['b'], 'config/cfg.json', tracker=tr)
        assert url.startswith(store.tracking_uri) and f"/runs/{ids['b']}/artifacts/config/cfg.json" in url
        assert requests.get(url.split('#')[0], timeout=10).ok


def test_statuses_and_nesting(store):
    tr = MLflowTracker(settings=store)
    with pytest.raises(ZeroDivisionError):
        with tr.start_run(run_name='bad') as failed: 1 / 0
    with pytest.raises(KeyboardInterrupt):
        with tr.start_run(run_name='stopped') as killed: raise KeyboardInterrupt()
    assert tr.get_run_info(failed.run_id).status == 'FAILED'
    assert tr.get_run_info(failed.run_id).tags['coronary_mlops.end_reason'].startswith('ZeroDivisionError')
    assert tr.get_run_info(killed.run_id).status == 'KILLED'
    parent = tr.start_run(run_name='parent')
    child = tr.start_run(run_name='child', nested=True)
    assert tr.run_id == child.run_id and mlflow.active_run().info.run_id == child.run_id
    tr.log_metric('x', 1.0)
    tr.end_run(run_id=parent.run_id)  # ends the child first
    assert tr.get_run_info(child.run_id).tags['mlflow.parentRunId'] == parent.run_id
    assert {tr.get_run_info(r.run_id).status for r in (parent, child)} == {'FINISHED'}
    assert mlflow.active_run() is None and tr.run_id is None
    with pytest.raises(ValueError, match='No active run'): tr.log_metric('x', 1.0)
    with pytest.raises(ValueError, match='status must be'): tr.end_run('DONE', run_id=parent.run_id)
    r = tr.start_run(resume_run_id=parent.run_id)
    assert tr.get_run_info(parent.run_id).status == 'RUNNING'
    tr.log_params({'a': 1})
    with pytest.raises(ParamConflictError): tr.log_params({'a': 2})
    tr.end_run('FAILED')
    assert tr.get_run_info(r.run_id).status == 'FAILED'


def test_params_rules(store):
    tr = MLflowTracker(settings=store)
    long = 'x' * 7000
    with tr.start_run() as run:
        got = tr.log_params({'notes': long, 'opt': {'name': 'AdamW', 'betas': (0.9, 0.999)}, 'aws_secret_access_key': 'AKIA-SECRET',
                             'db_uri': 'postgresql://u:hunter2@h/db'})
        with pytest.raises(ParamConflictError, match=r"param 'opt.name' .* already 'AdamW'"): tr.log_param('opt.name', 'SGD')
        tr.log_param('opt.name', 'AdamW')  # the same value again is fine
        with pytest.raises(ValueError, match='characters MLflow rejects'): tr.log_param('bad%key', 1)
        with pytest.raises(TypeError, match='expected a number'): tr.log_metric('loss', 'nan-ish')
        tr.set_tags({'long_tag': 'y' * 9000, 'api_token': 'tok'})
    p, t = tr.get_run_info(run.run_id).params, tr.get_run_info(run.run_id).tags
    assert p['opt.betas'] == '[0.9,0.999]' and p['aws_secret_access_key'] == '***' and p['db_uri'] == 'postgresql://u:***@h/db'
    assert p['notes'] == got['notes'] and p['notes'].startswith('@artifact params/notes.txt (7000 chars')
    assert t['api_token'] == '***' and t['long_tag'].startswith('@artifact tags/long_tag.txt (9000 chars')
    d = registry.download_artifacts(run.run_id, ['params/notes.txt', 'tags/long_tag.txt'], Path(tr.settings.store_dir)/'dl', tracker=tr)
    assert d[0].read_text() == long and d[1].read_text() == 'y' * 9000
    flat = json.dumps([p, t])
    assert 'hunter2' not in flat and 'AKIA-SECRET' not in flat


def test_metrics_order_and_memory_cap(store):
    "Points keep their steps and order; at the cap the queue moves to disk instead of growing or dropping"
    tr = MLflowTracker(settings=store, max_queue=500, flush_interval=30)  # the worker sleeps: only the cap can act
    with tr.start_run() as run:
        peak = 0
        for step in range(5000):
            tr.log_metric('loss', float(step), step=step)
            peak = max(peak, len(tr.queue.buf))
        assert peak <= 500 and tr.stats['spills'] >= 9 and tr.stats['spooled'] >= 4500
    hist = tr.client.get_metric_history(run.run_id, 'loss')
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.timestamp, m.step))] == [(s, float(s)) for s in range(5000)]
    assert tr.pending == 0


def test_artifacts_bulk_download_and_epochs(store, tmp_path):
    tr = MLflowTracker(settings=store)
    src = tmp_path/'preds'; src.mkdir()
    for i in range(6): (src/f"case_{i}.txt").write_text(str(i))
    with tr.start_run() as run:
        tr.log_artifacts(src, 'predictions')
        for e in range(2): tr.log_epoch(e, model_state=torch.nn.Linear(2, 2), metrics={'val_dice': 0.5 + e / 10})
        tr.artifacts.flush()
    listed = [f.path for f in registry.list_artifacts(run.run_id, recursive=True, tracker=tr)]
    assert {f"predictions/case_{i}.txt" for i in range(6)} <= set(listed) and 'checkpoints/epoch_001/model.pt' in listed
    got = registry.download_artifacts(run.run_id, [f"predictions/case_{i}.txt" for i in range(6)], tmp_path/'dl', tracker=tr)
    assert [p.read_text() for p in got] == [str(i) for i in range(6)]
    with pytest.raises(ValueError, match='escapes'): registry.download_artifacts(run.run_id, ['predictions/../../x'], tmp_path/'dl', tracker=tr)
    with pytest.raises(FileNotFoundError): tr.log_artifact(tmp_path/'missing.txt')
    rep = tr.artifacts.verify(run.run_id)
    assert rep.missing == [] and rep.modified == [] and rep.checked > 0


def test_deleted_experiment_is_a_clear_error(clean_env, tmp_path):
    s = load_settings(False, store_dir=str(tmp_path/'s'), experiment_name='gone')
    tr = MLflowTracker(settings=s)
    tr.client.delete_experiment(tr.experiment_id)
    with pytest.raises(TrackerError, match='is deleted: restore it'): MLflowTracker(settings=s).start_run()


def test_system_metrics_pass_through(clean_env, tmp_path):
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'s')), log_system_metrics=True)
    with tr.start_run() as run: time.sleep(2.5)
    keys = tr.get_run_info(run.run_id).metrics
    assert any(k.startswith('system/cpu_utilization') for k in keys), keys


# --- offline, fault and load -----------------------------------------------------------------------------------

def _points(tr, run_id, key):
    return sorted((m.step, m.value) for m in tr.client.get_metric_history(run_id, key))


def test_server_killed_mid_run_then_sync(tmp_path, clean_env, pg_db, s3):
    "Kill the server mid-run, keep logging, restart it, sync: every point is there exactly once, status included"
    srv = stack_server(tmp_path/'srv', pg_db, s3).start()
    try:
        s = load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=srv.uri, experiment_name='fault')
        tr = MLflowTracker(settings=s, flush_interval=0.05)
        run = tr.start_run()
        tr.log_params({'lr': 1e-3})
        for step in range(0, 1500):
            tr.log_metric('loss', 1.0 / (step + 1), step=step)
            if step == 500: assert tr.flush(); srv.stop()
            if step == 520: time.sleep(1.5)  # let the worker notice and go offline
        t0 = time.perf_counter()
        tr.log_params({'batch': 2}); tr.set_tag('phase', 'offline')
        assert time.perf_counter() - t0 < 0.1  # logging never waits for the dead server
        tr.log_epoch(1, metrics={'val_dice': 0.8}, model_state=torch.nn.Linear(2, 2))
        tr.artifacts.flush()
        assert tr.end_run() is False and tr.online is False
        assert tr.pending > 0 and tr.artifacts.spooled(run.run_id)
        with pytest.raises(ConnectionError, match='still unreachable'): tr.sync()
        srv.start()
        out = tr.sync()
        assert out['pending'] == 0 and out['epochs'] == 1
        info = tr.get_run_info(run.run_id)
        assert info.status == 'FINISHED' and info.params == {'lr': '0.001', 'batch': '2'} and info.tags['phase'] == 'offline'
        assert _points(tr, run.run_id, 'loss') == [(i, 1.0 / (i + 1)) for i in range(1500)]
        assert tr.sync()['records'] == 0  # a second sync sends nothing: no duplicates
        assert _points(tr, run.run_id, 'loss') == [(i, 1.0 / (i + 1)) for i in range(1500)]
        assert tr.artifacts.verify(run.run_id).missing == []
    finally: srv.stop()


def test_offline_from_the_start_is_created_by_sync_in_another_process(tmp_path, clean_env, pg_db, s3):
    "Like `wandb sync`: a run logged with the server down is created later, by a different process"
    port = free_port()
    s = load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=f"http://127.0.0.1:{port}", experiment_name='offline')
    tr = MLflowTracker(settings=s)
    with tr.start_run(run_name='plane', tags={'site': 'A'}) as run:
        assert run.run_id.startswith('offline-')
        for step in range(200): tr.log_metric('loss', step / 10, step=step)
        tr.log_params({'lr': 0.01}); tr.log_epoch(0, metrics={'val_dice': 0.5})
        tr.artifacts.flush()
    tr.close()
    srv = stack_server(tmp_path/'srv', pg_db, s3, port=port).start()
    try:
        code = textwrap.dedent(f"""
            from coronary_mlops.config import load_settings
            from coronary_mlops.tracker import MLflowTracker
            tr = MLflowTracker(settings=load_settings(False, store_dir={str(tmp_path/'client')!r}, tracking_uri={srv.uri!r}))
            print(tr.sync())
        """)
        p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        tr2 = MLflowTracker(settings=s)
        [info] = tr2.search_runs('offline', filter=f"tags.`coronary_mlops.offline_id` = '{run.local_id}'")
        assert info.run_name == 'plane' and info.status == 'FINISHED' and info.tags['site'] == 'A' and info.params == {'lr': '0.01'}
        assert _points(tr2, info.run_id, 'loss') == [(i, i / 10) for i in range(200)]
        assert 'metrics/epoch_000/metrics.json' in [f.path for f in registry.list_artifacts(info.run_id, 'metrics', recursive=True, tracker=tr2)]
    finally: srv.stop()


LOAD_SCRIPT = """
import sys
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
uri, store, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
tr = MLflowTracker(settings=load_settings(False, store_dir=store, tracking_uri=uri, experiment_name='load'))
with tr.start_run(run_name=f'worker-{i}') as run:
    for step in range(10_000): tr.log_metric('loss', step * 1e-4 + i, step=step)
print(run.run_id)
"""


def test_load_four_processes(server_stack, tmp_path, clean_env):
    "4 processes each log 10,000 points into their own run on the server: none are lost"
    procs = [subprocess.Popen([sys.executable, '-c', LOAD_SCRIPT, server_stack.uri, str(tmp_path/f'c{i}'), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try: outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs: p.kill()
    assert all(p.returncode == 0 for p in procs), [(p.returncode, o[1][-1500:]) for p, o in zip(procs, outs)]
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'q'), tracking_uri=server_stack.uri, experiment_name='load'))
    for i, (out, _) in enumerate(outs):
        pts = _points(tr, out.strip().splitlines()[-1], 'loss')
        assert len(pts) == 10_000 and [s for s, _ in pts] == list(range(10_000))
        assert pts[123][1] == pytest.approx(123e-4 + i)


# --- auth --------------------------------------------------------------------------------------------------------

def test_basic_auth_read_only_user(auth_server, tmp_path, clean_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    pw = auth_server.users
    s = load_settings(False, store_dir=str(tmp_path/'c'), tracking_uri=auth_server.uri, experiment_name='guarded')
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', 'admin'); monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', pw['admin'])
    admin = MLflowTracker(settings=s)
    with admin.start_run() as run:
        admin.log_params({'lr': 1e-3, 'mlflow_tracking_password': pw['admin']})
        admin.log_metric('val_dice', 0.8)
        log_tiny_model()
    mv = registry.register_model(run.run_id, tracker=admin)  # the team's model exists; READ users may not add versions
    admin.close()
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', 'reader'); monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', pw['reader'])
    reader = MLflowTracker(settings=s)
    assert reader.get_run_info(run.run_id).metrics['val_dice'] == 0.8  # READ works
    errors = []
    with pytest.raises(TrackerPermissionError, match="does not allow user 'reader' to start a run") as e: reader.start_run()
    errors.append(e.value)
    with pytest.raises(TrackerPermissionError, match='permission denied') as e: registry.register_model(run.run_id, mv.name, tracker=reader)
    errors.append(e.value)
    with pytest.raises(TrackerPermissionError) as e: registry.set_stage(mv.name, mv.version, 'Production', tracker=reader)
    errors.append(e.value)
    with pytest.raises(TrackerPermissionError) as e: registry.sync_tags(run.run_id, ['x'], tracker=reader)
    errors.append(e.value)
    with pytest.raises(TrackerPermissionError) as e: reader.start_run(resume_run_id=run.run_id)
    errors.append(e.value)
    monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', 'wrong-' + pw['reader'])
    with pytest.raises(TrackerPermissionError, match='rejected the credentials') as e: MLflowTracker(settings=s).start_run()
    errors.append(e.value)
    # the passwords appear in no error, log line, param, tag or artifact
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', 'admin'); monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', pw['admin'])
    info = MLflowTracker(settings=s).get_run_info(run.run_id)
    assert info.params['mlflow_tracking_password'] == '***'
    arts = registry.download_artifacts(run.run_id, [f.path for f in registry.list_artifacts(run.run_id, tracker=admin)], tmp_path/'a', tracker=admin)
    texts = [str(x) for x in errors] + [r.getMessage() for r in caplog.records] + [json.dumps([info.params, info.tags])] + \
            [f.read_text(errors='ignore') for a in arts for f in ([a] if a.is_file() else a.rglob('*')) if f.is_file()]
    for secret in pw.values(): assert not any(secret in t for t in texts)


def test_refused_records_are_kept_and_raised(clean_env, tmp_path):
    "A run deleted under a live tracker: the store refuses its points; they are kept in rejected/ and the error surfaces"
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'s')))
    run = tr.start_run()
    tr.log_metric('loss', 1.0, step=0); assert tr.flush()
    tr.client.delete_run(run.run_id)
    for step in range(1, 4): tr.log_metric('loss', 0.5, step=step)
    deadline = time.monotonic() + 60  # under load SQLite may answer 'database is locked' first: a retry, not a refusal
    with pytest.raises(TrackerError, match='MLflow refused to log to run'):
        while time.monotonic() < deadline: tr.flush(); time.sleep(0.2)
    kept = [json.loads(l) for f in (tr.spool_dir/'rejected').glob('*.jsonl') for l in f.read_text().splitlines()]
    assert [r[4] for r in kept if r[1] == 'm'] == [1, 2, 3]
    assert tr.stats['rejected'] >= 3
    tr.end_run(raise_errors=False)


def test_bad_arguments(clean_env, tmp_path):
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'s')))
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"): tr.get_best_run('val_dice', 'best')
    with pytest.raises(ValueError, match='No experiment named'): tr.search_runs('no-such-experiment')
    with pytest.raises(ValueError, match='still active'):
        with tr.start_run(): tr.start_run()
    dead = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'s'), tracking_uri=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ConnectionError, match='Cannot resume run'): dead.start_run(resume_run_id='0' * 32)
