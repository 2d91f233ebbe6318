"""Nothing lost, round 3, second ring (issue 26): a disk that fills or turns read-only while the artifact worker
writes an epoch's small files, its gzip copy or its checkpoint; a dead process's epoch on a full disk; a state with no
snapshot; repeated parking; a parked epoch of a deleted run; a disk that fills again during replay. Scenarios S12-S20
of a break-it round by a tester who had not seen the change. A 6 MB tmpfs (root mounts it; skipped elsewhere)."""
import errno, json, os, subprocess, sys, types
from pathlib import Path
import torch
import coronary_mlops.uploader as up
from coronary_mlops.artifacts import MLflowArtifactManager
from coronary_mlops.layout import epoch_file
from conftest import disk_store, fill, free, sync


def test_small_files_cut_by_a_full_disk_are_written_whole_once_there_is_room(small_disk, clean_env, monkeypatch, tmp_path):
    "S12: a metrics.json cut to 0 bytes was kept, skipped at replay and uploaded empty (and verify passed)"
    s, c, rid = disk_store(small_disk, clean_env, 's12')
    m = MLflowArtifactManager(s, async_upload=True)
    m.log_epoch(0, {'w': torch.rand(50_000)}, {'val_dice': 0.5}, run_id=rid); m.flush()
    real, hit = up._render, []
    def render(job, spec):
        if spec['epoch'] == 1 and not hit: hit.append(1); fill(small_disk, 0)  # nothing left, right now
        return real(job, spec)
    monkeypatch.setattr(up, '_render', render)
    m.log_epoch(1, {'w': torch.rand(50_000)}, {'val_dice': 0.6}, run_id=rid, metadata={'note': 'x' * 100})
    m.flush(); m.close(); free(small_disk)
    m2 = MLflowArtifactManager(s)
    assert m2.replay_spool() == 1 and m2.epochs(rid) == [0, 1]
    body = {k: Path(c.download_artifacts(rid, epoch_file(k, 1), str(tmp_path/k))).read_text() for k in ('metrics', 'metadata')}
    m2.close()
    assert json.loads(body['metrics'])['metrics'] == {'val_dice': 0.6} and json.loads(body['metadata'])['note'] == 'x' * 100


def test_an_epoch_met_by_a_read_only_disk_is_kept_until_the_disk_takes_writes_again(small_disk, clean_env, monkeypatch):
    "S13: the slab could not be moved on EROFS, and close() then deleted the staged epoch: lost"
    s, c, rid = disk_store(small_disk, clean_env, 's13')
    m = MLflowArtifactManager(s, async_upload=True)
    m.log_epoch(0, {'w': torch.rand(50_000)}, {'val_dice': 0.5}, run_id=rid); m.flush()
    ro = []
    def guard(fn):  # a tmpfs refuses remount,ro under an open slab: every write and rename under the store fails
        def g(*a, **k):
            if ro and any(str(small_disk) in str(x) for x in a): raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(a[0]))
            return fn(*a, **k)
        return g
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith('__')})
    fake_os.replace, fake_os.rename = guard(os.replace), guard(os.rename)
    monkeypatch.setattr(up, 'os', fake_os)
    real_render = up._render
    monkeypatch.setattr(up, '_render', lambda job, spec: (ro.append(1) if spec['epoch'] == 1 else None,
                                                         guard(real_render)(job, spec))[1])
    m.log_epoch(1, {'w': torch.rand(50_000)}, {'val_dice': 0.6}, run_id=rid)
    try: m.flush()
    except OSError as e: assert e.errno == errno.EROFS and str(small_disk) in str(e)
    ro.clear()  # writable again
    m.close(raise_errors=False); monkeypatch.undo()
    m2 = MLflowArtifactManager(s)
    m2.replay_spool()
    assert m2.epochs(rid) == [0, 1] and [x.value for x in c.get_metric_history(rid, 'val_dice')] == [0.5, 0.6]
    m2.close()


DEAD = """
import os, sys, torch
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import MLflowArtifactManager
from coronary_mlops.uploader import EpochUploader
s = load_settings(False, store_dir=sys.argv[1], tracking_uri=sys.argv[2], experiment_name='s14')
m = MLflowArtifactManager(s, async_upload=True)
EpochUploader._submit = lambda self, job, state=None, hashes=None: None  # killed before its worker ran
m.log_epoch(0, {'w': torch.rand(300_000)}, {'val_dice': 0.5}, run_id=sys.argv[3])
os._exit(0)
"""


def test_a_dead_processes_epoch_on_a_full_disk_blocks_no_start_and_is_filed_once_there_is_room(small_disk, clean_env, capsys):
    "S14: rebuilding its checkpoint on a full disk raised out of the manager's start: train and sync could not start"
    s, c, rid = disk_store(small_disk, clean_env, 's14')
    p = subprocess.run([sys.executable, '-c', DEAD, s.store_dir, s.tracking_uri, rid], capture_output=True, text=True)
    assert p.returncode == 0 and len(list(Path(s.store_dir, 'staging').rglob('job.json'))) == 1, p.stderr[-2000:]
    fill(small_disk, 200_000)  # less than the 1.2 MB checkpoint
    MLflowArtifactManager(s).close()  # starts
    rc, out = sync(s, capsys=capsys)
    assert rc == 1 and '1 epochs still wait' in out.out, out
    free(small_disk)
    m = MLflowArtifactManager(s)
    assert m.replay_spool() == 1 and m.epochs(rid) == [0]
    m.close()


def test_parked_epochs_come_back_in_order_with_the_best_tag_on_the_best(small_disk, clean_env, capsys):
    "S15 (passed): odd epochs, each the best so far, meet a full disk; the next epoch frees it"
    s, c, rid = disk_store(small_disk, clean_env, 's15', checkpoint_policy='all')
    m = MLflowArtifactManager(s, async_upload=True)
    dice = [0.5, 0.9, 0.6, 0.95]
    ws = [torch.full((300_000,), float(e)) for e in range(len(dice))]  # 1.2 MB each
    for e, d in enumerate(dice):
        if e % 2: fill(small_disk, 200_000)
        m.log_epoch(e, {'w': ws[e]}, {'val_dice': d}, run_id=rid); m.flush()
        if e % 2 and e < len(dice) - 1: free(small_disk)
    assert sync(s, capsys=capsys)[0] == 1  # the last one still waits for room
    m.close(); free(small_disk)
    assert sync(s, capsys=capsys)[0] == 0
    m2 = MLflowArtifactManager(s)
    assert m2.epochs(rid) == [0, 1, 2, 3] and c.get_run(rid).data.tags['coronary_mlops.best_epoch'] == '3'
    assert torch.equal(m2.best_checkpoint(rid)['w'], ws[3])
    assert [x.step for x in sorted(c.get_metric_history(rid, 'val_dice'), key=lambda x: x.timestamp)] == [0, 1, 2, 3]
    m2.close()


def test_a_full_disk_at_job_json_is_a_named_error_and_leaves_nothing_behind(small_disk, clean_env, monkeypatch):
    "S16 (passed)"
    s, c, rid = disk_store(small_disk, clean_env, 's16')
    m = MLflowArtifactManager(s, async_upload=True)
    m.log_epoch(0, {'w': torch.rand(50_000)}, {'val_dice': 0.5}, run_id=rid); m.flush()
    real, hit = up.write_atomic, []
    def wa(path, *a, **k):
        if path.name == 'job.json' and not hit: hit.append(1); fill(small_disk, 0)
        return real(path, *a, **k)
    monkeypatch.setattr(up, 'write_atomic', wa)
    try: m.log_epoch(1, {'w': torch.rand(50_000)}, {'val_dice': 0.6}, run_id=rid); err = None
    except OSError as e: err = e
    assert err is not None and err.errno == errno.ENOSPC and str(small_disk/'store'/'staging') in str(err)
    assert not [p for p in (small_disk/'store'/'staging').rglob('*.partial')]
    free(small_disk)
    m.log_epoch(2, {'w': torch.rand(50_000)}, {'val_dice': 0.7}, run_id=rid); m.flush()
    assert m.epochs(rid) == [0, 2]; m.close()


def test_an_epoch_whose_weights_cannot_be_parked_keeps_its_metrics_and_says_so(small_disk, clean_env, monkeypatch):
    "S17: a state with no snapshot (a float key) on a full disk: the whole epoch was lost, metrics included"
    s, c, rid = disk_store(small_disk, clean_env, 's17')
    m = MLflowArtifactManager(s, async_upload=True)
    state = lambda: {'w': torch.rand(50_000), 'sched': {0.5: torch.ones(1)}}
    m.log_epoch(0, state(), {'val_dice': 0.5}, run_id=rid); m.flush()
    real, hit = up.atomic_torch_save, []
    def save(obj, path):
        if '001' in str(path) and not hit: hit.append(1); fill(small_disk, 0)
        return real(obj, path)
    monkeypatch.setattr(up, 'atomic_torch_save', save)
    m.log_epoch(1, state(), {'val_dice': 0.6}, run_id=rid)
    try: m.flush(); err = None
    except Exception as e: err = e
    assert err is not None and 'could not be kept' in str(err) and 'metrics and files wait' in str(err), err
    m.close(raise_errors=False); free(small_disk)
    m2 = MLflowArtifactManager(s); m2.replay_spool()
    assert 1 in m2.epochs(rid) and [x.value for x in c.get_metric_history(rid, 'val_dice')] == [0.5, 0.6]
    m2.close()


def test_a_gzip_cut_by_a_full_disk_leaves_no_stray_file_in_the_epoch(small_disk, clean_env, monkeypatch, tmp_path):
    "S18: the cut .gz stayed in the epoch's tree and was filed as a file of its own, with a stale sha256"
    s, c, rid = disk_store(small_disk, clean_env, 's18', compress_threshold_mb=0.1)
    m = MLflowArtifactManager(s, async_upload=True, backoff=0.05)
    pred = tmp_path/'case1.nii'; pred.write_bytes(os.urandom(1_000_000))  # does not compress: its .gz is ~1 MB
    real, hit = up.EpochUploader._process, []
    def process(self, job, spec, hashes=None):
        if spec['epoch'] == 1 and not hit: hit.append(1); fill(small_disk, 300_000)  # room for a third of the .gz
        return real(self, job, spec, hashes)
    monkeypatch.setattr(up.EpochUploader, '_process', process)
    m.log_epoch(0, None, {'val_dice': 0.5}, run_id=rid); m.flush()
    m.log_epoch(1, None, {'val_dice': 0.6}, artifacts={'predictions': pred}, run_id=rid); m.flush()
    m.close(); free(small_disk)
    m2 = MLflowArtifactManager(s)
    assert m2.replay_spool() == 1
    assert sorted(e['path'] for e in m2.manifest(rid, 1)['files'] if 'case1' in e['path']) == ['predictions/epoch_001/case1.nii']
    assert m2.verify(rid).ok and m2.download(rid, 'predictions/epoch_001/case1.nii', tmp_path/'dl').read_bytes() == pred.read_bytes()
    m2.close()


def test_a_parked_epoch_of_a_deleted_run_is_set_aside_with_its_weights(small_disk, clean_env, capsys):
    "S19 (passed)"
    s, c, rid = disk_store(small_disk, clean_env, 's19')
    m = MLflowArtifactManager(s, async_upload=True)
    w1 = {'w': torch.rand(300_000)}
    m.log_epoch(0, {'w': torch.rand(300_000)}, {'val_dice': 0.5}, run_id=rid); m.flush()
    fill(small_disk, 200_000)
    m.log_epoch(1, w1, {'val_dice': 0.6}, run_id=rid); m.flush()
    m.close(); free(small_disk)
    c.delete_run(rid)
    rc, out = sync(s, capsys=capsys)
    [aside] = list((small_disk/'store'/'spool'/'rejected').glob(f'{rid}-001-*'))
    assert rc == 1 and aside.name in out.out
    [ck] = list(aside.rglob('model.pt'))
    assert torch.equal(torch.load(ck, weights_only=True)['w'], w1['w'])


def test_replay_that_meets_a_full_disk_midway_stops_keeps_the_rest_and_repeats_nothing(small_disk, clean_env, monkeypatch, capsys):
    "S20 (passed)"
    s, c, a = disk_store(small_disk, clean_env, 's20')
    b = c.create_run(c.get_experiment_by_name('s20').experiment_id).info.run_id
    m = MLflowArtifactManager(s, async_upload=True)
    w = {(r, e): {'w': torch.full((300_000,), float(10 * i + e))} for i, r in enumerate((a, b)) for e in (0, 1)}
    sa, sb = m.snapshot(w[a, 0]), m.snapshot(w[b, 0])  # two slabs at once: both are free again afterwards
    m.log_epoch(0, sa, {'val_dice': 0.5}, run_id=a); m.log_epoch(0, sb, {'val_dice': 0.5}, run_id=b); m.flush()
    fill(small_disk, 200_000)  # two free slabs, no room for a checkpoint
    m.log_epoch(1, w[a, 1], {'val_dice': 0.6}, run_id=a); m.log_epoch(1, w[b, 1], {'val_dice': 0.6}, run_id=b); m.flush()
    assert len(list((small_disk/'store'/'spool').glob('*/snapshot.bin'))) == 2
    m.close(); free(small_disk)
    real, calls = up._rebuild_checkpoint, []
    def rebuild(job, staging, spec):
        calls.append(job.name)
        if len(calls) == 2: fill(small_disk, 100_000)  # the first epoch went up; the disk fills again right now
        return real(job, staging, spec)
    monkeypatch.setattr(up, '_rebuild_checkpoint', rebuild)
    assert sync(s, capsys=capsys)[0] == 1 and len(list((small_disk/'store'/'spool').glob('*/job.json'))) == 1
    free(small_disk); monkeypatch.undo()
    assert sync(s, capsys=capsys)[0] == 0
    m2 = MLflowArtifactManager(s)
    for r in (a, b):
        assert m2.epochs(r) == [0, 1] and [x.value for x in c.get_metric_history(r, 'val_dice')] == [0.5, 0.6]
        assert torch.equal(m2.best_checkpoint(r)['w'], w[r, 1]['w'])
    m2.close()
