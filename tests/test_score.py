"`coronary-mlops evaluate`: another method's masks scored with the kit's metrics, on volumes the kit did not write"
import json
import numpy as np
import nibabel as nib
import nrrd
import pytest
from conftest import run_cli
from foreign_ct import chest, lps_affine, write_case

SPACING = (0.45, 0.45, 0.6)


def method_output(label, seed):
    "What another method might predict: the label with a slab cut out of one vessel, and a 3×3×3 blob of noise"
    p = label.copy() > 0
    zs = np.nonzero(p.any((0, 1)))[0]; p[:, :, zs[len(zs) // 2]:zs[len(zs) // 2] + 2] = False  # breaks both vessels
    rng = np.random.default_rng(seed)
    while True:
        c = rng.integers(3, np.array(p.shape) - 3)
        if not label[tuple(slice(i - 2, i + 3) for i in c)].any(): break
    p[tuple(slice(i - 1, i + 2) for i in c)] = True
    return p.astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    "Labels as ImageCAS (NIfTI LPS, int16 CT, 0/255 labels) and one as NRRD; predictions named as nnU-Net names them"
    gt, pred, truth = tmp_path/'gt', tmp_path/'nnunet_pred', {}
    pred.mkdir()
    for i, (fmt, shape) in enumerate([('nii', (37, 41, 29)), ('nii', (33, 35, 31)), ('nrrd', (31, 39, 27))]):
        hu, lab = chest(shape, SPACING, seed=i)
        c = write_case(gt, f"{i}", hu, lab, SPACING, fmt=fmt)
        p = method_output(lab, i)
        truth[str(i)] = (p, lab)
        if fmt == 'nrrd':  # the label's own header, so the prediction lies on its grid
            nrrd.write(str(pred/f"{i}.nrrd"), p * 2, nrrd.read_header(c['label']))  # class 2: any non-zero is vessel
        else: nib.save(nib.Nifti1Image(p, nib.load(c['label']).affine), str(pred/f"{i}.nii.gz"))
    return gt, pred, truth


def test_evaluate_scores_another_methods_masks_as_the_kit_scores_its_own_and_logs_them(folders, tmp_path, clean_env):
    from coronary_mlops.evaluate import case_metrics
    gt, pred, truth = folders
    store = tmp_path/'store'
    r = run_cli('--store-dir', str(store), '--experiment', 'baselines', 'evaluate', str(pred), str(gt),
                '--out', str(tmp_path/'scores'), '--log', '--method', 'nnU-Net 3d_fullres', '--workers', '2',
                check=False)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path/'scores'/'summary.json').read_text())
    rows = {row['case']: row for row in s['metric_per_case']}
    assert sorted(rows) == ['0', '1', '2'] and s['n_cases'] == 3
    for case, (p, lab) in truth.items():  # the same numbers as case_metrics on the arrays, in the file's spacing
        ref = case_metrics(p, lab, SPACING)
        for k, v in ref.items(): assert rows[case][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (case, k)
        assert rows[case]['betti0_error'] >= 2  # two vessels broken in two, and a blob: Dice barely sees them
        assert 0.8 < rows[case]['dice'] < 1
    assert s['mean']['dice'] == pytest.approx(np.mean([row['dice'] for row in rows.values()]))
    assert s['std']['hd95'] == pytest.approx(np.std([row['hd95_mm'] for row in rows.values()]))
    header = (tmp_path/'scores'/'cases.csv').read_text().splitlines()[0]
    assert header == 'case,dice,cldice,hd95_mm,assd_mm,betti0_error,betti1_error,pred_ml,true_ml'
    assert 'logged as run' in r.stdout
    # the logged run sits beside kit runs: test_* metrics, the external-method tag, and RunComparison takes it
    from coronary_mlops.comparison import RunComparison
    from coronary_mlops.config import load_settings
    from coronary_mlops.panel_base import lesson_runs
    from coronary_mlops.score import TAG_EXTERNAL
    from coronary_mlops.tracker import MLflowTracker
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(store), experiment_name='baselines'))
    ext, = tr.client.search_runs([tr.client.get_experiment_by_name('baselines').experiment_id])
    assert ext.data.tags[TAG_EXTERNAL] == 'nnU-Net 3d_fullres' and ext.info.run_name == 'nnU-Net 3d_fullres'
    assert ext.data.metrics['test_dice'] == pytest.approx(s['mean']['dice'])
    (tmp_path/'lesson').mkdir()
    kit_run, _ = lesson_runs(tr, tmp_path/'lesson')
    c = RunComparison([kit_run, ext.info.run_id], tracker=tr)
    assert c.epoch.value is None and dict((row[0], row[2]) for row in c.metric_rows)['test_dice'] == \
        pytest.approx(s['mean']['dice'])
    tr.close()


def test_evaluate_refuses_what_cannot_be_scored_naming_the_case_and_writes_nothing(folders, tmp_path, capsys):
    from coronary_mlops.cli import main
    gt, pred, truth = folders
    def refused(pred_dir, says):
        out = tmp_path/f"out-{says[:8].replace(' ', '_')}"
        assert main(['--store-dir', str(tmp_path/'store'), 'evaluate', str(pred_dir), str(gt), '--out', str(out),
                     '--workers', '1', '--quiet']) == 2
        err = capsys.readouterr().err
        assert says in err and err.startswith('coronary-mlops evaluate: ') and err.count('\n') == 1, err
        assert not out.exists()
    (tmp_path/'one').mkdir(); (tmp_path/'one'/'0.nii.gz').write_bytes((pred/'0.nii.gz').read_bytes())
    refused(tmp_path/'one', '2 of 3 labelled cases have no prediction')
    for name, change in [('flipped', lambda a: a @ np.diag([-1.0, 1, 1, 1])), ('resampled', lambda a: a * 2)]:
        d = tmp_path/name; d.mkdir()
        for f in pred.iterdir(): (d/f.name).write_bytes(f.read_bytes())
        img = nib.load(pred/'1.nii.gz')
        aff = change(img.affine.copy()); aff[3] = [0, 0, 0, 1]
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), aff), str(d/'1.nii.gz'))
        refused(d, "Case 1: the prediction is not on the label's grid")
    d = tmp_path/'probabilities'; d.mkdir()
    for f in pred.iterdir(): (d/f.name).write_bytes(f.read_bytes())
    p, lab = truth['0']
    nib.save(nib.Nifti1Image(p * np.float32(0.8), nib.load(pred/'0.nii.gz').affine), str(d/'0.nii.gz'))
    refused(d, 'holds fractions')


def test_an_empty_prediction_is_scored_by_the_documented_rule(folders, tmp_path):
    from coronary_mlops.score import score_folders
    gt, pred, truth = folders
    img = nib.load(pred/'0.nii.gz')
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(pred/'0.nii.gz'))
    s = score_folders(pred, gt, tmp_path/'scores', workers=1, progress=False)
    row = s['metric_per_case'][0]
    assert (row['dice'], row['hd95_mm'], row['assd_mm'], row['pred_ml']) == (0.0, None, None, 0.0)
    assert s['undefined_hd95'] == 1 and 'left out' in s['empty_mask_rule']
    assert s['mean']['hd95'] == pytest.approx(np.mean([r['hd95_mm'] for r in s['metric_per_case'][1:]]))
