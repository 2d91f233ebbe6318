"Adversarial scenarios for `evaluate` scoring, Preprocessing/TTA/small-piece removal, choose_min_component, RunComparison"
import json, math
from pathlib import Path
import numpy as np
import nibabel as nib
import nrrd
import pytest
import torch

SP = (0.5, 0.5, 0.8)
AFF = np.diag([*SP, 1.0])
SHAPE = (12, 12, 10)


def tube(shape=SHAPE, offset=0):
    "A small straight vessel, 0/1 uint8"
    a = np.zeros(shape, np.uint8); a[3 + offset:8 + offset, 4:6, 2:8] = 1
    return a


def save(a, path, aff=AFF):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(a, aff), str(path)); return path


def folders(tmp_path, names=('a', 'b')):
    gt, pr = tmp_path/'gt', tmp_path/'pred'
    for n in names: save(tube(), gt/f"{n}.nii.gz"); save(tube(), pr/f"{n}.nii.gz")
    return gt, pr


def cli(argv):
    from coronary_mlops.cli import main
    return main(argv)


def evaluate(tmp_path, pred, gt, out, *extra):
    return cli(['--store-dir', str(tmp_path/'store'), 'evaluate', str(pred), str(gt), '--out', str(out),
                '--workers', '1', '--quiet', *extra])


# 1 ------------------------------------------------------------------------------------------------------------------
def test_names_with_dots_spaces_unicode_nested_and_mixed_nii_extensions_pair_up(tmp_path):
    "Case names with dots, spaces and unicode; predictions nested one level down, as .nii for .nii.gz labels"
    from coronary_mlops.score import pair_masks, score_folders
    names = ['case.01.v2', 'my case 7', 'ünïcødé_ç']
    for i, n in enumerate(names):
        save(tube(offset=i % 2), tmp_path/'gt'/f"{n}.nii.gz")
        save(tube(offset=i % 2), tmp_path/'pred'/'fold0'/f"{n}.nii")
    save(tube(), tmp_path/'pred'/'fold0'/'not_labelled.nii.gz')  # extra prediction: warned, not scored
    pairs = pair_masks(tmp_path/'pred', tmp_path/'gt')
    assert [p['case'] for p in pairs] == sorted(names)
    s = score_folders(tmp_path/'pred', tmp_path/'gt', tmp_path/'out', workers=50, progress=False)  # workers > cases
    assert s['n_cases'] == 3 and s['mean']['dice'] == 1.0
    csv = (tmp_path/'out'/'cases.csv').read_text(encoding='utf-8')
    for n in names: assert n in csv


# 2 ------------------------------------------------------------------------------------------------------------------
def test_both_empty_and_empty_gt_follow_the_rule_and_summary_is_strict_json(tmp_path):
    from coronary_mlops.score import score_folders
    z = np.zeros(SHAPE, np.uint8)
    save(z, tmp_path/'gt'/'both.nii.gz'); save(z, tmp_path/'pred'/'both.nii.gz')
    save(z, tmp_path/'gt'/'gtempty.nii.gz'); save(tube(), tmp_path/'pred'/'gtempty.nii.gz')
    one = np.zeros(SHAPE, np.uint8); one[5, 5, 5] = 1  # a 1-voxel vessel predicted exactly
    save(one, tmp_path/'gt'/'onevox.nii.gz'); save(one, tmp_path/'pred'/'onevox.nii.gz')
    s = score_folders(tmp_path/'pred', tmp_path/'gt', tmp_path/'out', workers=1, progress=False)
    rows = {r['case']: r for r in s['metric_per_case']}
    assert rows['both']['dice'] == 1.0 and rows['both']['hd95_mm'] is None
    assert rows['gtempty']['dice'] == 0.0 and rows['gtempty']['hd95_mm'] is None and rows['gtempty']['true_ml'] == 0
    assert rows['onevox']['dice'] == 1.0 and rows['onevox']['hd95_mm'] == 0.0
    assert s['undefined_hd95'] == 2 and s['mean']['hd95'] == 0.0
    def no_nan(c): raise AssertionError(f"summary.json holds {c}")
    json.loads((tmp_path/'out'/'summary.json').read_text(), parse_constant=no_nan)


# 3 ------------------------------------------------------------------------------------------------------------------
def test_multilabel_and_255_predictions_count_any_nonzero_as_vessel(tmp_path):
    from coronary_mlops.score import score_folders
    lab = tube() * 255
    p = tube().astype(np.int16); p[5:8] *= 3  # classes 1 and 3
    save(lab.astype(np.uint8), tmp_path/'gt'/'a_gt.nii.gz'); save(p, tmp_path/'pred'/'a_pred.nii.gz')
    s = score_folders(tmp_path/'pred', tmp_path/'gt', tmp_path/'out', workers=1, progress=False)
    assert s['metric_per_case'][0]['case'] == 'a' and s['mean']['dice'] == 1.0


# 4 ------------------------------------------------------------------------------------------------------------------
def test_nan_voxels_in_a_prediction_are_refused_naming_the_case(tmp_path, capsys):
    gt, pr = folders(tmp_path)
    p = tube().astype(np.float32); p[0, 0, 0] = np.nan
    save(p, pr/'b.nii.gz')
    assert evaluate(tmp_path, pr, gt, tmp_path/'out') == 2
    err = capsys.readouterr().err
    assert err.startswith('coronary-mlops evaluate: ') and 'Case b' in err
    assert not (tmp_path/'out').exists()


# 5 ------------------------------------------------------------------------------------------------------------------
def test_a_probability_map_stored_as_scaled_uint8_is_refused_as_fractions(tmp_path, capsys):
    "uint8 0..255 with scl_slope 1/255: the file's values are probabilities 0..1, not a mask"
    gt, pr = folders(tmp_path)
    prob = np.clip(tube().astype(np.float32) * 0.9 + 0.05, 0, 1)
    img = nib.Nifti1Image(np.round(prob * 255).astype(np.uint8), AFF)
    img.header.set_slope_inter(1 / 255, 0)
    nib.save(img, str(pr/'a.nii.gz'))
    assert np.asanyarray(nib.load(pr/'a.nii.gz').dataobj).max() < 1  # nibabel reads fractions
    assert evaluate(tmp_path, pr, gt, tmp_path/'out') == 2
    err = capsys.readouterr().err
    assert 'Case a' in err and 'fractions' in err


# 6 ------------------------------------------------------------------------------------------------------------------
def test_grid_mismatches_and_broken_files_are_refused_naming_the_case(tmp_path, capsys):
    "Origin 2 voxels away, another shape, a truncated .nii.gz, a truncated .nii: exit 2, one line, no output"
    gt, pr = folders(tmp_path)
    def refused(make, says):
        d = tmp_path/f"p-{says[:6]}-{len(list(tmp_path.iterdir()))}"
        for f in pr.iterdir(): (d/f.name).parent.mkdir(exist_ok=True); (d/f.name).write_bytes(f.read_bytes())
        make(d)
        out = tmp_path/f"out-{d.name}"
        assert evaluate(tmp_path, d, gt, out) == 2
        err = capsys.readouterr().err
        assert err.startswith('coronary-mlops evaluate: ') and says in err and err.count('\n') == 1, err
        assert not out.exists()
    shifted = AFF.copy(); shifted[0, 3] = 2 * SP[0]
    refused(lambda d: save(tube(), d/'b.nii.gz', shifted), 'Case b')
    refused(lambda d: save(np.zeros((12, 12, 11), np.uint8), d/'b.nii.gz'), 'Case b')
    def trunc_gz(d): raw = (d/'b.nii.gz').read_bytes(); (d/'b.nii.gz').write_bytes(raw[:len(raw) // 2])
    refused(trunc_gz, 'b.nii.gz')
    def trunc_nii(d):
        (d/'b.nii.gz').unlink(); save(tube(), d/'b.nii'); raw = (d/'b.nii').read_bytes()
        (d/'b.nii').write_bytes(raw[:-100])
    refused(trunc_nii, 'b.nii')


# 7 ------------------------------------------------------------------------------------------------------------------
def test_a_corrupted_but_full_length_gzip_is_refused_cleanly_naming_the_case(tmp_path, capsys):
    "A flipped byte mid-stream (the gzip trailer's size still right): exit 2 and a one-line error, not a traceback"
    gt, pr = folders(tmp_path)
    raw = bytearray((pr/'b.nii.gz').read_bytes()); raw[len(raw) // 2] ^= 0xFF
    (pr/'b.nii.gz').write_bytes(bytes(raw))
    rc = evaluate(tmp_path, pr, gt, tmp_path/'out')  # BadGzipFile escaping here is the bug
    err = capsys.readouterr().err
    assert rc == 2 and 'b.nii.gz' in err and err.startswith('coronary-mlops evaluate: ')


# 8 ------------------------------------------------------------------------------------------------------------------
def test_an_out_path_that_is_a_file_is_a_clean_error(tmp_path, capsys):
    "--out names an existing file (as good as an unwritable folder): exit 2 with one line, not a traceback"
    gt, pr = folders(tmp_path)
    (tmp_path/'taken').write_text('not a folder')
    rc = evaluate(tmp_path, pr, gt, tmp_path/'taken')  # FileExistsError escaping here is the bug
    err = capsys.readouterr().err
    assert rc == 2 and 'taken' in err and err.startswith('coronary-mlops evaluate: ')


# 9 ------------------------------------------------------------------------------------------------------------------
def test_predictions_folder_equal_to_labels_folder_is_refused(tmp_path, capsys):
    "`evaluate gt gt` scores the labels against themselves: a perfect score that means nothing; it must be refused"
    gt, _ = folders(tmp_path)
    rc = evaluate(tmp_path, gt, gt, tmp_path/'out')
    assert rc == 2, f"scored the labels against themselves: {json.loads((tmp_path/'out'/'summary.json').read_text())['mean']}"


# 10 -----------------------------------------------------------------------------------------------------------------
def test_predictions_nested_in_the_labels_folder_and_out_inside_predictions_rerun(tmp_path):
    "gt/preds inside gt; --out inside preds; a second run reads the first run's outputs as nothing"
    from coronary_mlops.score import score_folders
    gt = tmp_path/'gt'
    for n in 'ab': save(tube(), gt/f"{n}.nii.gz"); save(tube(offset=1), gt/'preds'/f"{n}_seg.nii.gz")
    s1 = score_folders(gt/'preds', gt, gt/'preds'/'scores', workers=1, progress=False)
    s2 = score_folders(gt/'preds', gt, gt/'preds'/'scores', workers=1, progress=False)
    assert s1['n_cases'] == s2['n_cases'] == 2 and s1['mean'] == s2['mean'] and s1['mean']['dice'] < 1


# 11 -----------------------------------------------------------------------------------------------------------------
def test_nifti_prediction_of_an_nrrd_label_on_the_same_physical_grid_is_scored(tmp_path):
    "nnU-Net-style conversion: the label in NRRD (LPS), the prediction in NIfTI (RAS) with the equivalent affine"
    from coronary_mlops.score import score_folders
    lab = tube()
    hdr = {'space': 'left-posterior-superior', 'space directions': np.diag(SP).tolist(), 'space origin': [-12.5, 30.0, 4.0]}
    (tmp_path/'gt').mkdir(); nrrd.write(str(tmp_path/'gt'/'c.nrrd'), lab, hdr)
    ras = np.diag([-SP[0], -SP[1], SP[2], 1.0]); ras[:3, 3] = [12.5, -30.0, 4.0]
    save(lab, tmp_path/'pred'/'c.nii.gz', ras)
    s = score_folders(tmp_path/'pred', tmp_path/'gt', tmp_path/'out', workers=1, progress=False)
    assert s['mean']['dice'] == 1.0 and s['metric_per_case'][0]['true_ml'] == pytest.approx(lab.sum() * np.prod(SP) / 1000)


# 12 -----------------------------------------------------------------------------------------------------------------
def test_secrets_in_method_name_or_env_never_reach_the_mlflow_run(tmp_path, clean_env, monkeypatch, capsys):
    "--log --method with a token=… pair and an env secret's value: params, tags and the run NAME are all redacted"
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    gt, pr = folders(tmp_path)
    monkeypatch.setenv('MY_API_TOKEN', 'sup3rs3cretvalue')
    assert evaluate(tmp_path, pr, gt, tmp_path/'out', '--log', '--method', 'nnU-Net token=abc123xyz sup3rs3cretvalue') == 0
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(tmp_path/'store')))
    try:
        r, = tr.client.search_runs([tr.experiment_id])
        everything = json.dumps([r.info.run_name, r.data.params, r.data.tags])
        assert r.data.metrics['test_dice'] == 1.0 and math.isnan(r.data.metrics['test_hd95']) is False
        for secret in ('abc123xyz', 'sup3rs3cretvalue'): assert secret not in everything, (secret, r.info.run_name)
    finally: tr.close()


# 13 -----------------------------------------------------------------------------------------------------------------
def test_remove_small_pieces_is_by_physical_volume_with_diagonal_connectivity(tmp_path):
    from coronary_mlops.predict import remove_small_pieces
    m = np.zeros((9, 9, 9), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1   # two voxels touching at a corner only: one 26-connected piece, 2 mm³
    m[6, 6, 6] = 1                # one voxel: 1 mm³
    sp = (0.5, 1.0, 2.0)          # anisotropic: a voxel is 1 mm³
    out = remove_small_pieces(m, sp, 2.0)
    assert out.dtype == m.dtype and out.sum() == 2 and out[1, 1, 1] and out[2, 2, 2] and not out[6, 6, 6]
    assert remove_small_pieces(m, sp, 2.01).sum() == 0
    assert remove_small_pieces(m, (1.0, 1.0, 0.5), 1.0).sum() == 2  # 0.5 mm³ voxels: the single one goes
    assert remove_small_pieces(m, sp, 0) is m and remove_small_pieces(m, sp, -3) is m  # 0 (or less): none
    e = np.zeros((4, 5, 6), bool)
    assert remove_small_pieces(e, sp, 10).shape == e.shape and not remove_small_pieces(e, sp, 10).any()


# 14 -----------------------------------------------------------------------------------------------------------------
def test_remove_small_pieces_keeps_a_piece_of_exactly_the_threshold_volume():
    "0.7 mm isotropic: a voxel is 0.343 mm³; a piece of exactly min_mm3 is not 'smaller than' it and stays"
    from coronary_mlops.predict import remove_small_pieces
    m = np.zeros((5, 5, 5), np.uint8); m[2, 2, 2] = 1
    assert remove_small_pieces(m, (0.7, 0.7, 0.7), 0.343).sum() == 1
    m2 = np.zeros((20, 5, 5), np.uint8); m2[2:17, 2, 2] = 1  # 15 voxels of 0.216 mm³ = 3.24 mm³
    assert remove_small_pieces(m2, (0.6, 0.6, 0.6), 3.24).sum() == 15


# 15 -----------------------------------------------------------------------------------------------------------------
def test_remove_small_pieces_keeps_the_values_of_a_255_mask():
    "A 0/255 mask without its small pieces is still 0/255: the kept voxels are unchanged"
    from coronary_mlops.predict import remove_small_pieces
    m = np.zeros((9, 9, 9), np.uint8); m[1:5, 1:5, 1:5] = 255; m[7, 7, 7] = 255
    out = remove_small_pieces(m, (1, 1, 1), 2)
    assert out[7, 7, 7] == 0 and set(np.unique(out)) == {0, 255}


# 16 -----------------------------------------------------------------------------------------------------------------
def test_preprocessing_from_dict_old_new_and_unknown_keys():
    from coronary_mlops.predict import Preprocessing
    old = dict(pixdim=[0.8, 0.8, 0.8], window=[-200, 700], roi_size=[32, 32, 32], sw_batch_size=1)
    p = Preprocessing.from_dict(old)
    assert (p.mode, p.overlap, p.tta, p.min_component_mm3) == ('constant', 0.25, False, 0.0)
    assert p.roi_size == (32, 32, 32) and isinstance(p.window, tuple)
    q = Preprocessing.from_dict({**old, 'overlap': 0.5, 'future_knob': {'x': 1}, 'mode': 'gaussian'})
    assert q.overlap == 0.5 and q.mode == 'gaussian' and not hasattr(q, 'future_knob')
    r = Preprocessing(roi_size=(16, 24, 8), tta=True, min_component_mm3=5.5, mode='constant', overlap=0.1)
    assert Preprocessing.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# 17 -----------------------------------------------------------------------------------------------------------------
class Pointwise(torch.nn.Module):
    "A per-voxel 'network': flipping the input flips the output exactly, so all 8 mirrorings agree"
    def forward(self, x): return torch.cat([torch.zeros_like(x), (x - 0.3) * 3], 1)


def test_window_probs_tta_on_odd_shapes_agrees_with_plain_and_uncertainty_is_zero_when_mirrors_agree():
    from coronary_mlops.predict import Preprocessing, window_probs
    torch.manual_seed(0)
    x = torch.rand(1, 1, 13, 11, 9)  # odd, non-cubic, smaller than the window on one axis
    prep = Preprocessing(roi_size=(8, 8, 12), mode='gaussian')
    plain, none = window_probs(Pointwise(), x, prep)
    mean, sd = window_probs(Pointwise(), x, prep, tta=True)
    assert none is None and mean.shape == sd.shape == plain.shape == x.shape
    torch.testing.assert_close(mean, plain, atol=1e-6, rtol=0)
    assert sd.min() >= 0 and sd.max() <= 1e-5, f"SD of 8 identical predictions is {sd.max():.2e}, not 0"


# 18 -----------------------------------------------------------------------------------------------------------------
def test_window_probs_tta_is_the_mean_and_sd_of_the_8_mirrored_passes():
    from monai.inferers import sliding_window_inference
    from coronary_mlops.predict import MIRRORS, Preprocessing, window_probs
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.rand(1, 1, 11, 9, 7)
    prep = Preprocessing(roi_size=(8, 8, 8), mode='constant', overlap=0.25)
    with torch.no_grad():
        mean, sd = window_probs(net, x, prep, tta=True)
        ps = []
        for dims in MIRRORS:
            o = sliding_window_inference(x.flip(dims) if dims else x, prep.roi_size, 2, net, overlap=0.25, mode='constant')
            p = torch.softmax(o, 1)[:, 1:]; ps.append(p.flip(dims) if dims else p)
    ps = torch.stack(ps).double()
    assert len(MIRRORS) == 8 and len(set(MIRRORS)) == 8
    torch.testing.assert_close(mean.double(), ps.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(sd.double(), ps.std(0, unbiased=False), atol=2e-4, rtol=0)
    assert sd.max() > 1e-3  # padding makes the conv not mirror-symmetric: the flips disagree at the borders


# 19 -----------------------------------------------------------------------------------------------------------------
class Threshold(torch.nn.Module):
    def forward(self, x): return torch.cat([0.5 - x, x - 0.5], 1) * 20


def ct_array(shape=(21, 17, 13)):
    "Air, soft tissue, a bright tube along x and a tiny bright blob apart from it"
    a = np.full(shape, 40.0, np.float32); a[:3] = -1000
    a[3:19, 7:10, 5:8] = 400   # the vessel
    a[12, 14, 11] = 400        # one bright voxel, away from the vessel
    return a


def test_segmenter_tta_on_an_odd_anisotropic_array_returns_uncertainty_on_its_grid():
    from coronary_mlops.predict import Preprocessing, Segmenter
    prep = Preprocessing(pixdim=(1.0, 1.0, 1.0), roi_size=(16, 16, 16))
    seg = Segmenter(Threshold(), prep, device='cpu')
    a, sp = ct_array(), (0.5, 0.7, 0.9)
    plain, t = seg(a, sp), seg(a, sp, tta=True)
    assert 'uncertainty' not in plain
    assert t['mask'].shape == t['prob'].shape == t['uncertainty'].shape == a.shape
    assert t['uncertainty'].dtype == np.float32 and np.isfinite(t['uncertainty']).all() and t['uncertainty'].min() >= 0
    np.testing.assert_array_equal(t['mask'], plain['mask'])  # a per-voxel network: mirroring changes nothing
    np.testing.assert_allclose(np.linalg.norm(t['affine'][:3, :3], axis=0), sp, atol=1e-5)
    # the registered default: Preprocessing(tta=True) gives the uncertainty without asking
    assert 'uncertainty' in Segmenter(Threshold(), Preprocessing(pixdim=(1.0, 1.0, 1.0), roi_size=(16, 16, 16),
                                                                tta=True), device='cpu')(a, sp)


# 20 -----------------------------------------------------------------------------------------------------------------
def test_segmenter_min_component_removes_the_isolated_blob_but_not_the_vessel():
    from coronary_mlops.predict import Preprocessing, Segmenter
    a, sp = ct_array(), (0.5, 0.7, 0.9)
    def mask(mm3): return Segmenter(Threshold(), Preprocessing(pixdim=(0.5, 0.7, 0.9), roi_size=(16, 16, 16),
                                                                min_component_mm3=mm3), device='cpu')(a, sp)['mask']
    from scipy import ndimage
    m0, m1 = mask(0.0), mask(1.0)  # the blob is 0.315 mm³, the vessel 16×3×3 voxels = 45 mm³
    assert ndimage.label(m0, np.ones((3, 3, 3)))[1] == 2 and ndimage.label(m1, np.ones((3, 3, 3)))[1] == 1
    assert m1.sum() == m0.sum() - 1 and m1[12, 14, 11] == 0


# 21 -----------------------------------------------------------------------------------------------------------------
class ImageIsLogit(torch.nn.Module):
    "The 'network' predicts the image itself: image 1 → vessel, 0 → background"
    def forward(self, x): return torch.cat([0.5 - x, x - 0.5], 1) * 20


def test_choose_min_component_picks_the_smallest_threshold_that_removes_false_specks():
    from coronary_mlops.evaluate import PIECE_SIZES_MM3, choose_min_component
    from coronary_mlops.predict import Preprocessing
    lab = np.zeros((2, 1, 20, 20, 20), np.float32); lab[:, :, 4:16, 8:11, 8:11] = 1   # a 108-voxel vessel
    img = lab.copy(); img[0, 0, 1, 1, 1] = img[0, 0, 18, 18, 18] = img[1, 0, 1, 18, 2] = 1  # 1-voxel specks
    prep = Preprocessing(pixdim=(0.8, 0.8, 0.8), roi_size=(16, 16, 16))  # a voxel: 0.512 mm³
    loader = [dict(image=torch.from_numpy(img), label=torch.from_numpy(lab * 255))]
    best, rows = choose_min_component(ImageIsLogit(), loader, prep, torch.device('cpu'))
    assert [r['min_component_mm3'] for r in rows] == [0.0, *PIECE_SIZES_MM3]
    assert rows[0]['val_betti0_error'] == 1.5 and rows[1]['val_betti0_error'] == 0.0 and rows[1]['val_dice'] > rows[0]['val_dice']
    assert best == 1.0
    # thresholds over the vessel's 55 mm³ would remove it: never chosen
    assert next(r for r in rows if r['min_component_mm3'] == 100.0)['val_dice'] == 0.0
    # no loader batches: nothing to choose from, so no removal
    assert choose_min_component(ImageIsLogit(), [], prep, torch.device('cpu'))[0] == 0.0


# 22 -----------------------------------------------------------------------------------------------------------------
def test_run_comparison_of_plain_mlflow_runs_that_share_no_epoch(tmp_path, clean_env):
    from coronary_mlops.comparison import RunComparison
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(tmp_path/'store'), experiment_name='cmp'))
    c = tr.client
    try:
        ids = []
        for name, vals, lr, extra in [('plain-a', [0.5, 0.6, 0.7], '0.01', {}), ('plain-b', [0.4, 0.8], '0.1',
                                                                                  {'only_b': float('nan')})]:
            r = c.create_run(tr.experiment_id, run_name=name)
            for i, v in enumerate(vals): c.log_metric(r.info.run_id, 'val_dice', v, step=i)
            for k, v in extra.items(): c.log_metric(r.info.run_id, k, v)
            c.log_param(r.info.run_id, 'learning_rate', lr); c.log_param(r.info.run_id, 'same', 'x')
            c.set_terminated(r.info.run_id); ids.append(r.info.run_id)
        cmp = RunComparison(ids + [ids[0]], tracker=tr)  # a repeated id is compared once
        assert cmp.epoch.value is None and cmp.names == ['plain-a', 'plain-b']
        rows = {r[0]: r[1:] for r in cmp.metric_rows}
        assert rows['val_dice'][0] == 0.7 and rows['val_dice'][1] == 0.8 and rows['val_dice'][2] == pytest.approx(0.1)
        assert rows['only_b'][0] == '–' and rows['only_b'][2] == ''  # missing / NaN: no delta
        assert [r[0] for r in cmp.param_rows] == ['learning_rate']
        assert len(cmp.histories[0]['val_dice']) == 3 and '<svg' in cmp.curves.value
        md = cmp._repr_markdown_()
        assert 'final metrics (no shared epoch)' in md and 'share no epoch' in cmp.json_diff.value
        with pytest.raises(ValueError, match='share no epoch'): RunComparison(ids, epoch=0, tracker=tr)
        with pytest.raises(ValueError, match='2 to 8'): RunComparison([ids[0], ids[0]], tracker=tr)
    finally: tr.close()
