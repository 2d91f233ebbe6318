"""Data checked before any run (issue 25, part 1), on volumes another generator writes (tests/foreign_ct.py): refused
before a run exists, reported and trained on, a NaN loss, and a held-out evaluation that cannot run"""
import math, os
import numpy as np
import nibabel as nib
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from mlflow import MlflowClient
from foreign_ct import chest, write_case

TINY = dict(epochs=2, roi_size=(16, 16, 16), channels=(4, 8), strides=(2,), samples_per_case=1, batch_size=1)


def runs_in(store):
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    if not (store/'mlflow.db').exists(): return client, []
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def folder(root, n=4, **kw):
    "n foreign cases, each of its own odd shape and spacing"
    cases = []
    for i in range(n):
        sp = (0.42 + 0.02 * i, 0.45, 0.6 + 0.05 * i)
        hu, lab = chest(shape=(33 + 2 * i, 39 - i, 27 + i), spacing=sp, seed=i, crop=kw.get('crop', False))
        cases.append(write_case(root, f"case{i}", hu, lab, sp, **{k: v for k, v in kw.items() if k != 'crop'}))
    return cases


def test_plan_reports_a_flipped_label_nan_in_the_body_and_a_cropped_ct_and_train_refuses_before_any_run(clean_env, capsys):
    from coronary_mlops.cli import main
    data, store = clean_env/'data', clean_env/'store'
    cases = folder(data, 4, crop=True)
    write_case(data, 'case1', *chest(shape=(35, 38, 28), spacing=(0.44, 0.45, 0.65), seed=1), (0.44, 0.45, 0.65),
               flip_label_x=True)
    img = nib.load(cases[2]['image']); hu = img.get_fdata(dtype=np.float32)
    hu[15:18, 18:21, 12:15] = np.nan  # inside the body: the network would see them
    nib.save(nib.Nifti1Image(hu, img.affine), cases[2]['image'])
    assert main(['--store-dir', str(store), 'plan', '--data', str(data), '--quiet']) == 1
    out = capsys.readouterr().out
    lines = {w: [l for l in out.splitlines() if f' {w} ' in l] for w in ('geometry', 'nonfinite', 'no-air')}
    assert len(lines['geometry']) == 1 and 'case1.img.nii.gz' in lines['geometry'][0] and 'is LPS' in lines['geometry'][0]
    assert len(lines['nonfinite']) == 1 and '27 NaN' in lines['nonfinite'][0] and 'case2.img' in lines['nonfinite'][0]
    assert all('error' in l for l in lines['geometry'] + lines['nonfinite'])
    assert {l.split('has no voxel')[0].split('/')[-1].strip() for l in lines['no-air']} >= {'case0.img.nii.gz', 'case3.img.nii.gz'}
    assert 'pixdim   :' in out and 'cache    :' in out  # the plan from the usable cases
    rc = main(['--store-dir', str(store), 'train', '--data', str(data), '--epochs', '1', '--roi', '16'])
    err = capsys.readouterr().err
    assert rc == 2 and '2 of 4 cases cannot be used' in err and 'case1.img.nii.gz' in err and 'case2.img.nii.gz' in err
    assert runs_in(store)[1] == []  # refused before a run existed
    assert (store/'cache'/'checks.json').exists()  # the second check (train's) read the kept findings


def test_a_cropped_int16_lps_0_255_anisotropic_folder_trains_and_ends_finished_with_test_metrics(clean_env):
    "The bug that lost whole runs: a heart-cropped CT trained, then its held-out evaluation refused it"
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.train import TrainConfig, train
    data = clean_env/'data'
    folder(data, 4, crop=True)
    s = load_settings(False, store_dir=str(clean_env/'store'), experiment_name='cropped')
    tr = MLflowTracker(settings=s)
    res = train(TrainConfig(**TINY), data_dir=data, tracker=tr, progress=False, work_dir=clean_env/'work')
    info = tr.get_run_info(res.run_id)
    assert info.status == 'FINISHED' and res.test_missing is None
    assert math.isfinite(res.test['test_dice']) and len(res.cases) == 1
    assert res.cases[0]['true_ml'] > 0  # scored on the case's own int16-scaled LPS grid against its 0/255 label
    local = tr.client.download_artifacts(res.run_id, 'data/check.json', str(clean_env/'dl'))
    import json
    found = json.load(open(local))
    assert found['errors'] == [] and {w['what'] for w in found['warnings']} == {'no-air', 'label-scale'}
    tr.close()


def test_a_nan_loss_ends_the_run_failed_naming_the_epoch_and_case_and_keeps_the_last_good_checkpoint(clean_env, capsys):
    from coronary_mlops.cli import main
    store = clean_env/'store'
    # AdamW at lr 1e30: the first step is finite, then every weight is huge and the next loss is NaN
    rc = main(['--store-dir', str(store), 'train', '--synthetic', '3', '--epochs', '4', '--roi', '16',
               '--channels', '4,8', '--strides', '2', '--samples-per-case', '1', '--batch-size', '1', '--lr', '1e30'])
    err = capsys.readouterr().err
    assert rc == 1 and 'The training loss is nan in epoch 1 (counted from 0' in err and 'step 1) on ' in err, err
    client, [run] = runs_in(store)
    assert run.info.status == 'FAILED' and run.data.tags['coronary_mlops.end_reason'].startswith('NonFiniteLossError')
    assert run.data.tags['coronary_mlops.best_checkpoint'] == 'checkpoints/epoch_000/model.pt'
    from coronary_mlops.artifacts import load_checkpoint
    state = load_checkpoint(client.download_artifacts(run.info.run_id, 'checkpoints/epoch_000/model.pt', str(clean_env/'dl')))
    assert state['epoch'] == 0 and all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())


def test_a_held_out_evaluation_that_cannot_run_leaves_the_run_finished_with_its_model_and_says_why(clean_env):
    "A test scan that vanishes while training (a network share unmounted): the run keeps what training made"
    from coronary_mlops.config import load_settings
    from coronary_mlops.layout import TAG_TEST_MISSING
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.train import Monitor, TrainConfig, train
    data = clean_env/'data'
    folder(data, 3)

    class Unmount(Monitor):
        def begin(self, run_id, epochs):
            import json
            split = json.loads((clean_env/'work'/'split.json').read_text())
            os.remove(split['test'][0]['image'])  # already cached for training; gone for the held-out evaluation

    s = load_settings(False, store_dir=str(clean_env/'store'), experiment_name='vanish')
    tr = MLflowTracker(settings=s)
    res = train(TrainConfig(**TINY), data_dir=data, tracker=tr, progress=False, work_dir=clean_env/'work', monitor=Unmount())
    run = tr.client.get_run(res.run_id)
    assert run.info.status == 'FINISHED' and res.model_uri and res.segmenter_uri
    assert 'held-out evaluation failed' in run.data.tags[TAG_TEST_MISSING] and 'case' in run.data.tags[TAG_TEST_MISSING]
    assert '**No held-out test metrics**' in run.data.tags['mlflow.note.content']
    assert not any(k.startswith('test_') for k in run.data.metrics)
    tr.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 300), min_size=1, max_size=6, unique=True), st.booleans())
def test_one_label_rule_for_the_check_and_the_transform(values, merge):
    "label_problem decides; VesselLabeld maps exactly what it accepts to (label > 0) and refuses what it refuses"
    from coronary_mlops.data import DataError, VesselLabeld, label_problem
    why = label_problem(values, merge)
    pos = [v for v in values if v > 0]
    assert (why is None) == (min(values) >= 0 and (len(pos) <= 1 or merge))
    x = torch.tensor(values, dtype=torch.float32)
    if why is None: assert torch.equal(VesselLabeld('label', merge)({'label': x})['label'], (x > 0).float())
    else:
        with pytest.raises(DataError): VesselLabeld('label', merge)({'label': x})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.tuples(st.booleans(), st.booleans(), st.booleans()), perm=st.permutations([0, 1, 2]),
       shift=st.floats(-3, 3), spacing=st.tuples(*[st.sampled_from([0.35, 0.5, 0.8, 1.25, 5.0])] * 3))
def test_a_label_is_refused_exactly_when_its_axes_differ_and_reported_when_its_origin_is_off(tmp_path, flips, perm,
                                                                                           shift, spacing):
    "Voxels are paired by index (MONAI's Orientationd and Spacingd keep each file's own origin): only the axes matter"
    from coronary_mlops.data import geometry_drift, geometry_mismatch
    a = np.zeros((4, 4)); a[3, 3] = 1
    for i, ax in enumerate(perm): a[ax, i] = spacing[i] * (-1 if flips[i] else 1)
    a[:3, 3] = (10.0, -5.0, 2.0)
    vol = np.zeros((5, 6, 7), np.uint8); vol[2, 3, 4] = 1
    img, lab = str(tmp_path/'img.nii.gz'), str(tmp_path/'lab.nii.gz')
    nib.save(nib.Nifti1Image(vol, a), img)
    b = a.copy(); b[0, 3] += shift  # the origin moved along world x: that is voxel axis perm.index(0)
    nib.save(nib.Nifti1Image(vol, b), lab)
    assert geometry_mismatch(img, lab) is None
    assert (geometry_drift(img, lab) is None) == (abs(shift) / spacing[perm.index(0)] <= 0.5)
    c = a.copy(); c[:, 0] = -c[:, 0]  # one axis reversed in the label's header
    nib.save(nib.Nifti1Image(vol, c), lab)
    assert 'Axis directions differ by up to 180.0°' in geometry_mismatch(img, lab)


def test_nrrd_in_lps_space_with_a_flipped_label_is_refused_and_a_true_pair_passes(tmp_path):
    from coronary_mlops.check import check_cases
    hu, lab = chest(shape=(31, 35, 25), spacing=(0.5, 0.5, 0.7), seed=5)
    good = write_case(tmp_path/'good', 'a', hu, lab, (0.5, 0.5, 0.7), fmt='nrrd')
    bad = write_case(tmp_path/'bad', 'a', hu, lab, (0.5, 0.5, 0.7), fmt='nrrd', flip_label_x=True)
    r = check_cases([good, bad], progress=False)
    assert [(f.case, f.what) for f in r.errors] == [(bad['image'], 'geometry')]
    assert [(f.case, f.what) for f in r.warnings] == [(good['image'], 'label-scale'), (bad['image'], 'label-scale')]  # 0/255


# --- scenarios a helper who had not seen the change tried (break-it round), kept as tests ----------------------------

def nrrd_pair(folder, hu, lab, img_space, lab_space, origin=True):
    import nrrd
    folder.mkdir(parents=True, exist_ok=True)
    def hdr(space):
        h = {'space directions': np.diag([0.5, 0.5, 0.7]).tolist()}
        if origin: h['space origin'] = [1.0, 2.0, 3.0]
        if space: h['space'] = space
        else: h['space dimension'] = 3
        return h
    nrrd.write(str(folder/'a.img.nrrd'), hu.astype(np.int16), hdr(img_space))
    nrrd.write(str(folder/'a.label.nrrd'), lab, hdr(lab_space))
    return dict(image=str(folder/'a.img.nrrd'), label=str(folder/'a.label.nrrd'))


def test_nrrd_headers_are_placed_as_monai_places_them(tmp_path):
    "No `space`: MONAI reads LPS. Before, the check read RAS: a mirrored label passed, a good pair was refused"
    from coronary_mlops.check import check_case
    from coronary_mlops.data import transforms
    hu, lab = chest(shape=(31, 35, 25), spacing=(0.5, 0.5, 0.7), seed=2)
    mirrored = nrrd_pair(tmp_path/'m', hu, lab, 'right-anterior-superior', None)
    assert [f.what for f in check_case(mirrored) if f.level == 'error'] == ['geometry']
    same = nrrd_pair(tmp_path/'s', hu, lab, 'left-posterior-superior', None)
    assert [f.level for f in check_case(same)] == []
    d = transforms(train=False, window=(-200, 700))(dict(same))  # and MONAI pairs them: the label is on the vessels
    assert float(d['image'][d['label'] > 0].mean()) > 0.5 > float(d['image'][d['image'] > 0.1].mean())
    no_origin = nrrd_pair(tmp_path/'o', hu, lab, 'left-posterior-superior', 'left-posterior-superior', origin=False)
    [f] = check_case(no_origin)
    assert f.what == 'unreadable' and "no 'space origin'" in f.message


def test_damaged_files_are_refused_by_name_never_a_traceback(tmp_path, capsys):
    import gzip as gz
    from coronary_mlops.cli import main
    cases = folder(tmp_path/'data', 3)
    raw = bytearray(gz.decompress(open(cases[0]['label'], 'rb').read()))
    packed = bytearray(gz.compress(bytes(raw)))
    packed[len(packed) // 2:len(packed) // 2 + 64] = bytes(64)  # 64 bytes zeroed mid-stream; the size trailer intact
    open(cases[0]['label'], 'wb').write(bytes(packed))
    hu, lab = chest(shape=(31, 35, 25), spacing=(0.5, 0.5, 0.7), seed=3)
    c = write_case(tmp_path/'data', 'case9', hu, lab, (0.5, 0.5, 0.7), fmt='nrrd')
    data = open(c['image'], 'rb').read(); open(c['image'], 'wb').write(data[:len(data) - 5000])  # a short NRRD
    rc = main(['--store-dir', str(tmp_path/'store'), 'plan', '--data', str(tmp_path/'data'), '--quiet'])
    out, err = capsys.readouterr()
    assert rc == 1 and 'Traceback' not in out + err
    bad = sorted(l for l in out.splitlines() if ' unreadable ' in l)  # ImageCAS names are found in any format
    assert len(bad) == 2 and 'case0.img.nii.gz' in bad[0] and 'CRC check failed' in bad[0], out
    assert 'case9.img.nrrd' in bad[1], out
    from coronary_mlops.check import check_case
    [f] = check_case(c)  # and on its own
    assert f.what == 'unreadable' and 'case9.img.nrrd' in f.message


def test_nan_beside_the_lung_is_inside_the_body(tmp_path):
    "The lungs reach the first and last slices of a chest CT: NaN touching them was taken as outside, and as air"
    from coronary_mlops.check import image_findings
    hu, _ = chest(shape=(40, 44, 30), spacing=(0.5, 0.5, 0.7), seed=4)
    x, y = np.meshgrid(np.arange(40), np.arange(44), indexing='ij')
    lung = ((x - 10)**2 + (y - 22)**2 < 25)[..., None] & np.ones(30, bool)  # a lung through every slice
    hu[lung] = -800
    nan = hu.copy(); nan[15:18, 20:24, 10:14] = np.nan  # in the tissue beside the lung, touching it
    assert [f.what for f in image_findings(nan, 'x')] == ['nonfinite']
    ring = hu.copy(); ring[:2] = np.nan; ring[:, :2] = np.nan  # the field of view's edge
    assert [f.what for f in image_findings(ring, 'x')] == ['nonfinite-outside']
    norm = (hu + 1024) / 4095; norm[:2, :2] = np.nan  # normalised, NaN in the corners
    assert [f.level for f in image_findings(norm, 'x')] == ['warning', 'warning']


@pytest.mark.parametrize('what,make,says', [
    ('constant', lambda hu: np.full_like(hu, -1000), 'holds one value only'),
    ('all NaN', lambda hu: np.full_like(hu, np.nan), 'holds no finite voxel'),
    ('25-class mask', lambda hu: np.where(hu > 300, np.round(hu) % 25, 0), 'looks like a label mask'),
])
def test_images_that_cannot_be_ct_are_refused(what, make, says):
    from coronary_mlops.check import image_findings
    hu, _ = chest(seed=6)
    [f] = image_findings(make(hu), 'x')
    assert f.level == 'error' and says in f.message


def test_an_origin_a_fifth_of_a_slice_off_is_not_refused_and_a_label_of_1_0000001_is_named_exactly(tmp_path):
    from coronary_mlops.check import check_case
    hu, lab = chest(shape=(33, 37, 9), spacing=(0.35, 0.35, 5.0), seed=7)
    c = write_case(tmp_path, 'a', hu, lab, (0.35, 0.35, 5.0), label_255=False)
    l = nib.load(c['label']); aff = l.affine.copy(); aff[2, 3] += 1.0
    nib.save(nib.Nifti1Image(np.asanyarray(l.dataobj), aff), c['label'])
    assert [f.level for f in check_case(c)] == []
    nib.save(nib.Nifti1Image(lab.astype(np.float32) * np.float32(1.0000001), aff), c['label'])
    [f] = check_case(c)
    assert f.what == 'label-values' and '(1.000000119)' in f.message


def test_kept_findings_follow_the_files_not_their_mtime_and_a_wrong_cache_file_is_ignored(tmp_path):
    from coronary_mlops.check import check_cases
    cases = folder(tmp_path/'d', 3)
    cache = tmp_path/'cache'
    assert check_cases(cases, cache_dir=cache, progress=False).errors == []
    p = cases[1]['label']; st = os.stat(p)
    l = nib.load(p); lab = np.asanyarray(l.dataobj).copy(); lab[lab > 0] = 3; lab.flat[np.flatnonzero(lab)[::2]] = 7
    nib.save(nib.Nifti1Image(lab, l.affine), p); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back
    assert [f.what for f in check_cases(cases, cache_dir=cache, progress=False).errors] == ['label-values']
    for junk in ('[]', 'null', '{torn'):
        (cache/'checks.json').write_text(junk)
        assert len(check_cases(cases, cache_dir=cache, progress=False).errors) == 1


def test_plan_says_a_folder_of_two_cases_cannot_be_trained(tmp_path, capsys):
    from coronary_mlops.cli import main
    folder(tmp_path/'d', 2)
    assert main(['--store-dir', str(tmp_path/'s'), 'plan', '--data', str(tmp_path/'d'), '--quiet']) == 1
    assert 'cannot be split into train, val and test' in capsys.readouterr().out


def test_the_kits_warnings_survive_mlflow_pytorch_setting_the_root_logger_to_error():
    import logging
    import mlflow.pytorch  # noqa: F401  (its import runs logging.basicConfig(level=ERROR))
    assert logging.getLogger('coronary_mlops.train').isEnabledFor(logging.WARNING)


def test_an_asoca_nrrd_folder_gets_held_out_test_metrics(clean_env):
    "Held-out labels were opened with nibabel, which cannot read NRRD: every ASOCA run ended without test metrics"
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.train import TrainConfig, train
    root = clean_env/'ASOCA'
    for i in range(3):
        hu, lab = chest(shape=(31 + i, 35, 25), spacing=(0.5, 0.5, 0.7), seed=10 + i)
        c = write_case(root/'tmp', f'{i}', hu, lab, (0.5, 0.5, 0.7), fmt='nrrd', label_255=False)
        for k, sub in (('image', 'CTCA'), ('label', 'Annotations')):
            (root/sub).mkdir(parents=True, exist_ok=True); os.replace(c[k], root/sub/f'{i}.nrrd')
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(clean_env/'store'), experiment_name='asoca'))
    res = train(TrainConfig(**TINY), data_dir=root, tracker=tr, progress=False, work_dir=clean_env/'work')
    assert res.test_missing is None and math.isfinite(res.test['test_dice']) and res.cases[0]['true_ml'] > 0
    tr.close()
