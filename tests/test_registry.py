"""The model registry on real stores (the embedded SQLite store and the PostgreSQL + S3 server): registration's
rules, aliases, the best run promoted, tags kept in step both ways, and ONNX export checked against torch."""
import pytest, torch
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
from coronary_mlops import registry
from conftest import log_tiny_model

pytestmark = pytest.mark.server


def test_register_refuses_unfinished_and_missing_model(store):
    tr = MLflowTracker(settings=store)
    run = tr.start_run()
    log_tiny_model()
    with pytest.raises(ValueError, match='is RUNNING; only FINISHED runs are registered'): registry.register_model(run.run_id, tracker=tr)
    mv = registry.register_model(run.run_id, tracker=tr, require_finished=False)  # the override still works
    assert mv.run_id == run.run_id
    tr.end_run()
    with tr.start_run() as empty: pass
    with pytest.raises(ValueError, match='has no logged model'): registry.register_model(empty.run_id, tracker=tr)
    with pytest.raises(ValueError, match='Unknown stage'): registry.set_stage(mv.name, mv.version, 'prod', tracker=tr)
    with pytest.raises(ValueError, match='not usable'): registry.set_alias(mv.name, mv.version, 'v3', tracker=tr)


def test_promote_best_and_reuse(store):
    tr = MLflowTracker(settings=store)
    runs = {}
    for dice in (0.7, 0.9, float('nan')):
        with tr.start_run() as r:
            tr.log_metric('val_dice', dice)
            log_tiny_model()
        runs[dice] = r.run_id
    with tr.start_run():  # better, but FAILED: never promoted
        tr.log_metric('val_dice', 0.99); tr.end_run('FAILED')
    mv = registry.promote_best(metric='val_dice', mode='max', tracker=tr)
    assert mv.run_id == runs[0.9] and mv.aliases == ['champion']
    again = registry.promote_best(metric='val_dice', mode='max', alias='prod-eu', tracker=tr)
    assert again.version == mv.version and set(again.aliases) == {'champion', 'prod-eu'}
    with pytest.raises(ValueError, match='No FINISHED run'): registry.promote_best(metric='val_hd95', tracker=tr)


def test_label_sync_both_ways(store):
    tr = MLflowTracker(settings=store)
    with tr.start_run() as a: pass
    with tr.start_run() as b: pass
    registry.sync_tags(a.run_id, ['LAD', 'stenosis>50%', 'site A'], tracker=tr)
    registry.sync_tags(b.run_id, ['RCA', 'site A'], tracker=tr)
    assert registry.read_tags(a.run_id, tracker=tr) == ['LAD', 'stenosis>50%', 'site A']
    assert tr.get_run_info(a.run_id).labels == ['LAD', 'stenosis>50%', 'site A']
    found = lambda label: {r.run_id for r in tr.search_runs(filter=f"tags.`{registry.label_key(label)}` = 'true'")}
    assert found('site A') == {a.run_id, b.run_id} and found('LAD') == {a.run_id}
    assert registry.label_key('stenosis>50%') == 'tag.stenosis_50_'
    registry.sync_tags(a.run_id, ['RCA'], tracker=tr)  # mirrors exactly: old labels go
    tags = tr.get_run_info(a.run_id).tags
    assert registry.read_tags(a.run_id, tracker=tr) == ['RCA'] and 'tag_1' not in tags and 'tag.LAD' not in tags
    assert found('RCA') == {a.run_id, b.run_id}
    for bad, msg in (([''], 'Empty label'), (['a,b'], 'comma'), (['x' * 300], 'at most')):
        with pytest.raises(ValueError, match=msg): registry.sync_tags(a.run_id, bad, tracker=tr)
    assert registry.read_tags(a.run_id, tracker=tr) == ['RCA']  # a refused sync changes nothing


def test_onnx_matches_torch(clean_env, tmp_path):
    "The exported 3D U-Net runs in onnxruntime within atol 1e-4 + rtol 1e-3 of torch; a wrong graph is caught"
    from monai.networks.nets import UNet
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(tmp_path/'s')))
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    x = torch.randn(1, 1, 32, 32, 32)
    with tr.start_run() as run: path = registry.export_onnx(net, x, tmp_path/'model.onnx', run_id=run.run_id, tracker=tr)
    assert float(tr.get_run_info(run.run_id).tags['onnx.max_abs_diff']) < 1e-4
    assert registry.check_onnx(net, torch.randn(3, 1, 32, 32, 32), path) < 1e-4  # dynamic batch axis
    with torch.no_grad(): next(net.parameters()).add_(0.5)  # the ONNX file now holds the old weights
    with pytest.raises(AssertionError, match='ONNX and torch disagree'): registry.check_onnx(net, x, path)
