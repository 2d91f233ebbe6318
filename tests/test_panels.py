"""The notebook panels' logic against real stores: values are set and buttons clicked as a user would, then the
widgets' state, the files on disk and the registry's contents are checked. (The browser test renders them.)"""
import gzip, hashlib, warnings
from dataclasses import replace
from pathlib import Path

import mlflow, nibabel as nib, numpy as np, pytest, torch
from matplotlib.figure import Figure

from coronary_mlops import registry
import coronary_mlops.panels as panels
from coronary_mlops.config import load_settings
from coronary_mlops.panels import ArtifactBrowser, RegisterModelPanel, RunArtifacts, RunComparison, SliceViewer
from coronary_mlops.tracker import MLflowTracker

NET = torch.nn.Conv3d(1, 2, 3, padding=1).eval()


def _log_model():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mlflow.pytorch.log_model(NET, name='model', input_example=np.zeros((1, 1, 8, 8, 8), np.float32), pip_requirements=['torch'])


def make_run(tr, work: Path, name: str, dices, lr=1e-3, model=True, status='FINISHED') -> str:
    "A run shaped like train's: per epoch metrics, a curves PNG, a NIfTI prediction, a log (the same every epoch)"
    work.mkdir(parents=True, exist_ok=True)
    log_file = work/'train.log'
    log_file.write_text('\n'.join(f"line {i}: loss {i / 1000:.4f}" for i in range(500)))  # identical each epoch: dedup
    with tr.start_run(run_name=name) as r:
        for ep, d in enumerate(dices):
            fig = Figure(figsize=(2, 2)); fig.subplots().plot(dices[:ep + 1])
            vol = np.zeros((12, 12, 6), np.uint8); vol[3:9, 6 - ep:7 + ep, 1:5] = 1
            nib.save(nib.Nifti1Image(vol, np.eye(4)), work/'pred.nii.gz')
            tr.log_epoch(ep, model_state=NET, metrics={'val_dice': d, 'train_loss': 1 - d},
                         artifacts={'training_curves': fig, 'predictions': work/'pred.nii.gz', 'logs': log_file},
                         metadata={'hyperparameters': {'learning_rate': lr, 'batch_size': 2}, 'seed': 1})
        tr.artifacts.flush()
        if model: _log_model()
    if status != 'FINISHED': tr.client.set_terminated(r.run_id, status)
    return r.run_id


@pytest.fixture
def tracker(store):
    # files over 1 KB are gzipped in the store, so the panels must undo the compression (and the dedup) to show them
    tr = MLflowTracker(settings=replace(store, compress_threshold_mb=0.001))
    yield tr
    tr.close()


def sha(p: Path) -> str: return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def as_logged(p: Path, e: dict) -> bool:
    "The downloaded file holds what was logged: the same bytes, or for a .gz the same content (an S3 store may re-encode it)"
    if 'content_sha256' in e: return hashlib.sha256(gzip.decompress(p.read_bytes())).hexdigest() == e['content_sha256']
    return sha(p) == e['sha256']


def test_browser_shows_and_downloads_what_was_logged(tracker, tmp_path):
    a = make_run(tracker, tmp_path/'a', 'a', [0.5, 0.7, 0.6])
    b_id = make_run(tracker, tmp_path/'b', 'b', [0.4, 0.8, 0.85, 0.9])
    b = ArtifactBrowser(experiment=tracker.experiment_name, tracker=tracker, download_dir=tmp_path/'dl')
    assert b.status.value == ''
    assert [v for _, v in b.run_select.options] == [b_id, a]  # newest first
    assert b.run_select.options[0][0].split(' · ')[1:] == ['FINISHED', 'val_dice 0.900', 'b']
    assert b.epoch.value == 3 and [v for _, v in b.epoch.options] == [0, 1, 2, 3]
    assert b.epoch.options[3][0] == '3 ★'  # the best epoch, from the manager's tag
    assert '0.9' in b.metrics.value and 'val_dice' in b.metrics.value
    assert b.summary.outputs[0]['data']['text/markdown'].startswith('#### Epoch 3 Summary')
    assert b.tree.value.endswith('curves.png') and 'image/png' in b.preview.outputs[0]['data']

    b.run_select.value = a
    b.epoch.value = 1
    b.category.value = 'logs'
    assert b.tree.value == 'logs/epoch_001/train.log' and b.status.value == '', b.status.value
    entry = next(e for e in b.run.files(1) if e['path'] == b.tree.value)
    assert entry.get('dedup') and entry['stored'].startswith('logs/epoch_000/')  # stored once, in epoch 0, gzipped
    shown = b.preview.outputs[0]['data']['text/plain'].splitlines()
    assert shown[0] == '… 460 earlier lines' and shown[-1] == 'line 499: loss 0.4990'

    b.category.value = 'all'
    b.download_epoch.click()
    assert b.status.value.startswith('Copied 7 files')
    got = {p.relative_to(tmp_path/'dl'/a).as_posix(): p for p in b.last_download}
    want = {e['path']: e for e in b.run.files(1)}
    assert set(got) == set(want)
    assert all(as_logged(got[k], want[k]) for k in want)  # what was logged, whatever the store did with it
    assert sha(got['logs/epoch_001/train.log']) == sha(tmp_path/'a'/'train.log')


def test_browser_reads_one_manifest_per_epoch_shown(tracker, tmp_path):
    "Lazy loading, counted rather than timed: opening a run of 60 epochs reads one manifest, each switch one more"
    with tracker.start_run(run_name='long') as r:
        for ep in range(60): tracker.log_epoch(ep, metrics={'val_dice': ep / 100})
        tracker.artifacts.flush()
    b = ArtifactBrowser(r.run_id, tracker=tracker)
    assert (len(b.run.epochs), b.epoch.value, b.run.reads) == (60, 59, 1)
    for ep in (3, 40, 3): b.epoch.value = ep
    assert b.run.reads == 3  # 59, 3, 40; epoch 3 again comes from the cache
    assert 'val_dice' in b.metrics.value and '0.03' in b.metrics.value


def test_browser_on_an_empty_experiment_and_a_run_without_epochs(tracker, tmp_path):
    tracker.experiment_id  # created, no runs
    b = ArtifactBrowser(tracker=tracker)
    assert b.run is None and 'no runs yet' in b.metrics.value and b.status.value == ''
    with tracker.start_run(run_name='bare') as r: tracker.log_metric('x', 1.0)
    b.refresh()
    assert b.run_select.value == r.run_id and 'has no epochs' in b.metrics.value
    assert 'ArtifactBrowser' in b._repr_markdown_()
    assert "No experiment named 'nope'" in ArtifactBrowser(experiment='nope', tracker=tracker).status.value


def test_download_never_leaves_its_folder(tracker, tmp_path):
    "A manifest that names ../ paths (a tampered store) is refused in the panel, and nothing is written outside"
    run = make_run(tracker, tmp_path/'a', 'a', [0.5], model=False)
    ra = RunArtifacts(run, tracker)
    ra.manifest(0)['files'].append({'path': '../../outside.txt', 'size': 1, 'sha256': '0', 'stored': 'logs/epoch_000/train.log.gz'})
    b = ArtifactBrowser(run, tracker=tracker, download_dir=tmp_path/'dl')
    b.run = ra
    b.download_epoch.click()
    assert "'..' escapes the artifact root" in b.status.value
    assert not (tmp_path/'outside.txt').exists() and not (tmp_path/'dl'/'outside.txt').exists()


def test_comparison_lines_up_the_same_epoch(tracker, tmp_path):
    ids = [make_run(tracker, tmp_path/n, n, d, lr=lr, model=False)
           for n, d, lr in (('a', [0.5, 0.6, 0.7], 1e-3), ('b', [0.55, 0.75], 3e-3), ('c', [0.4, 0.5, 0.6, 0.65], 1e-3))]
    c = RunComparison(ids, tracker=tracker)
    assert list(c.epoch.options) == [0, 1] and c.epoch.value == 1  # the last epoch all three have
    rows = {r[0]: r[1:] for r in c.metric_rows}
    assert rows['val_dice'][:3] == (0.6, 0.75, 0.5)
    assert rows['val_dice'][3] == pytest.approx(0.15) and rows['val_dice'][4] == pytest.approx(-0.1)
    assert c.diff_rows == [('hyperparameters.learning_rate', '0.001', '0.003', '0.001')]
    assert c.image_keys == ['visualizations/training_curves/curves.png']
    assert [len(row.children[1].children) for row in c.images.children] == [3]
    c.epoch.value = 0
    assert {r[0]: r[1:] for r in c.metric_rows}['val_dice'][:3] == (0.5, 0.55, 0.4)
    with pytest.raises(ValueError, match='2 to 8 different runs'): RunComparison(ids[:1] * 2, tracker=tracker)
    with pytest.raises(ValueError, match='Not every run has epoch 3'): RunComparison(ids, epoch=3, tracker=tracker)


def test_register_panel_registers_and_guards(tracker, tmp_path):
    good = make_run(tracker, tmp_path/'g', 'good', [0.6, 0.8])
    failed = make_run(tracker, tmp_path/'f', 'failed', [0.7], status='FAILED')
    p = RegisterModelPanel(experiment=tracker.experiment_name, tracker=tracker)
    name = registry.model_name(tracker.experiment_name, settings=tracker.settings)
    assert (p.run_select.value, p.name.value, p.register.disabled) == (good, name, False)  # the newest FINISHED run
    assert 'FINISHED' in p.info.value

    p.alias.value, p.tags.value = 'challenger', 'data=phantoms-v2, reviewed'
    p.register.click()
    assert p.status.value == '' and '✔ Registered' in p.result.value
    mv = registry.get_version(name, 'challenger', tracker=tracker)
    assert (str(mv.version), mv.run_id, mv.tags) == ('1', good, {'data': 'phantoms-v2', 'reviewed': 'true'})
    if tracker.is_server: assert f"/#/models/{name}/versions/1" in p.result.value
    else: assert f"models:/{name}@challenger" in p.result.value

    p.run_select.value = failed
    assert p.register.disabled and 'Run is FAILED' in p.reason.value
    p.register.click()  # ipywidgets does not fire a disabled button's clicks from the browser; from code it is refused
    assert '⚠' in p.status.value

    p.run_select.value = good
    for alias, custom, tags in (('custom', 'latest', ''), ('champion', '', 'password=hunter2')):
        p.alias.value, p.custom_alias.value, p.tags.value = alias, custom, tags
        p.register.click()
        assert '⚠ ValueError' in p.status.value
    assert 'hunter2' not in p.status.value
    assert len(tracker.client.search_model_versions(f"name='{name}'")) == 1  # nothing half-registered
    p.tags.value = ''
    p.register.click()
    assert str(registry.get_version(name, 'champion', tracker=tracker).version) == '2'
    assert '| registered | version 2 |' in p._repr_markdown_()


def test_register_panel_shows_permission_errors(auth_server, tmp_path, clean_env, monkeypatch):
    "A READ-only user gets one line naming the refusal in the panel, not a traceback"
    s = load_settings(False, store_dir=str(tmp_path/'c'), tracking_uri=auth_server.uri, experiment_name='panel-guarded')
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', 'admin'); monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', auth_server.users['admin'])
    admin = MLflowTracker(settings=s)
    with admin.start_run() as r:
        admin.log_metric('val_dice', 0.8)
        _log_model()
    registry.register_model(r.run_id, tracker=admin)  # the team's model exists: READ users may not add versions to it
    admin.close()
    monkeypatch.setenv('MLFLOW_TRACKING_USERNAME', 'reader'); monkeypatch.setenv('MLFLOW_TRACKING_PASSWORD', auth_server.users['reader'])
    p = RegisterModelPanel(r.run_id, tracker=MLflowTracker(settings=s))
    assert not p.register.disabled
    p.register.click()
    assert 'TrackerPermissionError' in p.status.value and 'reader' in p.status.value
    assert auth_server.users['reader'] not in p.status.value and len(p.status.value) < 800
    assert p.last_version is None


def test_register_panel_from_a_fresh_process(tracker, tmp_path):
    """The README's flow: a run trained earlier, then a new notebook kernel, configured by the environment, that only
    opens the panel and clicks. MLflow resolves the LoggedModel through its *global* tracking URI, which such a process
    has not pointed anywhere (it would be ./mlflow.db)."""
    import os, subprocess, sys
    run = make_run(tracker, tmp_path/'a', 'a', [0.7])
    s = tracker.settings
    code = """if True:
        import mlflow
        from coronary_mlops.panels import RegisterModelPanel
        print('GLOBAL', mlflow.get_tracking_uri())
        p = RegisterModelPanel('%s')
        p.register.click()
        print('STATUS', p.status.value or 'ok', p.last_version.version if p.last_version else None)""" % run
    env = {k: v for k, v in os.environ.items() if not k.startswith(('MLFLOW_', 'CORONARY_MLOPS_'))}
    env.update(CORONARY_MLOPS_STORE_DIR=s.store_dir, CORONARY_MLOPS_TRACKING_URI=s.tracking_uri,
               CORONARY_MLOPS_EXPERIMENT_NAME=s.experiment_name)
    cwd = tmp_path/'kernel'; cwd.mkdir()
    out = subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert f"GLOBAL sqlite:///{cwd}/mlflow.db" in out.stdout, out.stdout  # the case that broke: MLflow's default
    assert 'STATUS ok 1' in out.stdout, out.stdout + out.stderr[-3000:]
    assert not (cwd/'mlflow.db').exists()  # nothing written beside the notebook
    name = registry.model_name(s.experiment_name, settings=s)
    assert registry.get_version(name, 'champion', tracker=tracker).run_id == run


def test_browser_opens_a_volume_in_the_slice_viewer_and_reads_it_once(tracker, tmp_path, monkeypatch):
    run = make_run(tracker, tmp_path/'a', 'a', [0.5, 0.7])
    b = ArtifactBrowser(run_id=run, tracker=tracker)
    b.category.value = 'predictions'
    nii = next(p for _, p in b.tree.options if p.endswith('.nii.gz'))
    b.tree.value = nii
    v = b.viewer.children[0]
    assert isinstance(v, SliceViewer) and v.pred is not None and v.label is None  # 'pred.nii.gz' is a prediction
    assert v.image.shape == nib.load(b.run.local(nii)).shape and 'in the slice viewer' in b.preview.outputs[0]['data']['text/plain']
    before = v.img.value
    v.axis.value = 'sagittal'; v.index.value = 6
    assert v.img.value != before and 'sagittal slice 7/' in v.caption.value
    reads = []
    monkeypatch.setattr(panels, 'read_volume', lambda *a, **k: reads.append(a) or pytest.fail(f'read again: {a}'))
    b.category.value = 'all'; b.tree.value = nii  # selected again in the same epoch: not read again
    assert list(b._volumes) == [nii] and reads == []
    monkeypatch.undo()  # another epoch's volume is read, as it should be
    b.epoch.value = 0
    assert b._volumes == {} or nii not in b._volumes  # another epoch: the old volumes are let go


def test_comparison_overlays_curves_of_up_to_eight_runs_and_diffs_params(tracker, tmp_path):
    ids = [make_run(tracker, tmp_path/f'r{i}', f'r{i}', [0.3 + 0.1 * i, 0.4 + 0.1 * i], lr=10.0 ** -(i % 3), model=False)
           for i in range(8)]
    c = RunComparison(ids, tracker=tracker)
    assert c.tabs.titles == ('same epoch', 'curves and params') and c.curves.value.count('<g id="run-7">') == 2
    assert [len(h['val_dice']) for h in c.histories] == [2] * 8
    from coronary_mlops.panels import curves_across_runs
    f = curves_across_runs(c.histories, c.names, 'wall time')
    assert [len(a.lines) for a in f.axes] == [8, 8] and f.axes[0].get_xlabel() == 'minutes'
    with pytest.raises(ValueError, match='2 to 8 different runs'): RunComparison(ids + [ids[0], 'x' * 32], tracker=tracker)



def test_a_monitor_in_another_process_follows_and_stops_a_cli_training(clean_env):
    "Issue 15: TrainingMonitor(run_id) follows a CLI training by polling the store, and its Stop ends it by a tag"
    import shutil, subprocess, time
    from coronary_mlops.panels import TrainingMonitor
    from conftest import BIN
    store = clean_env/'store'
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(store), experiment_name='far'))  # creates the store
    exe = shutil.which('coronary-mlops', path=str(BIN))
    proc = subprocess.Popen([exe, '--store-dir', str(store), '--experiment', 'far', 'train', '--synthetic', '3',
                             '--epochs', '40', '--patience', '40', '--roi', '32', '--channels', '8,16,32', '--strides', '2,2',
                             '--samples-per-case', '2'], cwd=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0, runs = time.time(), []
        while not runs:
            assert proc.poll() is None and time.time() - t0 < 240, proc.stdout.read() if proc.poll() is not None else 'no run'
            try: runs = tr.search_runs('far', max_results=1)
            except ValueError: pass  # the training has not created the experiment yet
            time.sleep(0.5)
        mon = TrainingMonitor(runs[0].run_id, tracker=tr, poll_s=0.5, show=False)
        while len(mon.history) < 2:
            assert proc.poll() is None and time.time() - t0 < 400, 'the monitor saw fewer than 2 epochs'
            time.sleep(0.5)
        mon.request_stop()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        run = tr.client.get_run(runs[0].run_id)
        assert run.info.status == 'FINISHED' and run.data.tags['coronary_mlops.stopped'].endswith('stopped by hand')
        assert 2 <= len(tr.client.get_metric_history(run.info.run_id, 'train_loss')) < 40
        mon._thread.join(timeout=30)
        assert mon.done and mon.stop.description == 'finished' and mon.overlay.value[:4] == b'\x89PNG'
    finally:
        if proc.poll() is None: proc.kill()
