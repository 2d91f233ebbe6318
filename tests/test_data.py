"Data discovery and checks on the layouts of the public sets, with real NIfTI and NRRD files"
import numpy as np, nrrd, pytest
from coronary_mlops.data import (DataError, check_pairs, datasets, discover, find_cause, generate_phantoms, make_phantom,
                                 save_nifti, split_cases, transforms, PhantomConfig)


def _nrrd(path, arr, spacing):
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), arr, {'space': 'left-posterior-superior', 'space directions': np.diag(spacing).tolist(), 'space origin': [0.0, 0.0, 0.0]})


def test_asoca_layout_with_nrrd(tmp_path):
    ph = make_phantom(1, PhantomConfig(shape=(32, 32, 32)))
    for group in ('Normal', 'Diseased'):
        for i in (1, 2):
            _nrrd(tmp_path/group/'CTCA'/f'{group}_{i}.nrrd', ph['image'], (0.8, 0.8, 0.8))
            _nrrd(tmp_path/group/'Annotations'/f'{group}_{i}.nrrd', ph['label'], (0.8, 0.8, 0.8))
    cases = check_pairs(discover(tmp_path))
    assert [c['image'].split('/')[-2:] for c in cases][:2] == [['CTCA', 'Diseased_1.nrrd'], ['CTCA', 'Diseased_2.nrrd']]
    assert all(c['label'].replace('Annotations', 'CTCA') == c['image'] for c in cases)
    d = transforms(roi_size=(16, 16, 16))(dict(cases[0]))  # MONAI reads the NRRD through pynrrd
    assert tuple(d[0]['image'].shape) == (1, 16, 16, 16)
    _nrrd(tmp_path/'Normal'/'Annotations'/'Normal_1.nrrd', ph['label'], (0.8, 0.8, 1.6))
    with pytest.raises(DataError, match=r'Spacings differ: .*Normal_1.nrrd has \(0.8, 0.8, 0.8\) mm, label has \(0.8, 0.8, 1.6\) mm'):
        check_pairs(discover(tmp_path))


def test_imagecas_layout_in_case_folders_and_orphans(tmp_path):
    ph = make_phantom(2, PhantomConfig(shape=(24, 24, 24)))
    for i in (1, 2, 3):
        save_nifti(ph['image'], ph['spacing'], tmp_path/str(i)/f'{i}.img.nii.gz')
        save_nifti(ph['label'], ph['spacing'], tmp_path/str(i)/f'{i}.label.nii.gz')
    assert len(discover(tmp_path)) == 3
    save_nifti(ph['label'], ph['spacing'], tmp_path/'4'/'4.label.nii.gz')
    with pytest.raises(DataError, match='Labels without an image'): discover(tmp_path)
    (tmp_path/'4'/'4.label.nii.gz').unlink()
    (tmp_path/'3'/'3.label.nii.gz').unlink()
    with pytest.raises(DataError, match=r'3.img.nii.gz has no label: expected 3.label.nii.gz'): discover(tmp_path)


def test_bad_folders_and_splits(tmp_path):
    with pytest.raises(DataError, match='does not exist'): discover(tmp_path/'nope')
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataError, match='No image/label pairs .* --synthetic N'): discover(tmp_path/'empty')
    cases = generate_phantoms(3, tmp_path/'p', config=PhantomConfig(shape=(24, 24, 24)), progress=False)
    with pytest.raises(DataError, match='2 cases cannot be split'): split_cases(cases[:2])
    with pytest.raises(ValueError, match='summing to 1'): split_cases(cases, (0.5, 0.5, 0.5))
    s = split_cases(cases, seed=7)
    assert sorted(c['image'] for v in s.values() for c in v) == sorted(c['image'] for c in cases)
    assert s == split_cases(cases, seed=7) and all(len(v) == 1 for v in s.values())


def test_non_binary_label_is_named(tmp_path):
    "A multi-class label is refused naming its values; a 0/3 label is one class, read as vessel"
    ph = make_phantom(0, PhantomConfig(shape=(24, 24, 24)))
    save_nifti(ph['image'], ph['spacing'], tmp_path/'1.img.nii.gz')
    two = ph['label'] * 3; two[:12] = np.minimum(two[:12], 1)  # classes 1 and 3
    save_nifti(two, ph['spacing'], tmp_path/'1.label.nii.gz')
    with pytest.raises(RuntimeError) as e: transforms(roi_size=(16, 16, 16))(discover(tmp_path)[0])
    err = find_cause(e.value)
    assert isinstance(err, DataError) and '1.label.nii.gz holds 2 classes [1, 3]' in str(err) and '--merge-labels' in str(err)
    save_nifti(ph['label'] * 3, ph['spacing'], tmp_path/'1.label.nii.gz')
    d = transforms(roi_size=(16, 16, 16), train=False)(discover(tmp_path)[0])
    assert d['label'].unique().tolist() == [0.0, 1.0] and int(d['label'].sum()) > 0


def test_cache_and_plain_datasets_give_the_same_validation_volume(tmp_path):
    cases = generate_phantoms(3, tmp_path/'p', config=PhantomConfig(shape=(32, 32, 32)), progress=False)
    a, b = datasets(cases, roi_size=(16, 16, 16)), datasets(cases, roi_size=(16, 16, 16), cache=False)
    assert type(a['val']).__name__ == 'CacheDataset' and type(b['val']).__name__ == 'Dataset'
    assert np.allclose(a['val'][0]['image'], b['val'][0]['image'])
    assert a['split'] == b['split']


def test_the_memory_budget_picks_memory_below_and_disk_above_and_a_second_run_reuses_the_disk_cache(tmp_path):
    "Issue 13 (part): caching chosen by a budget from the headers; the disk cache is kept and reused"
    import time
    cases = generate_phantoms(4, tmp_path/'ph', config=PhantomConfig(shape=(32, 32, 32)), progress=False)
    mem = datasets(cases, roi_size=(16, 16, 16), cache_budget_gb=1.0)
    assert mem['cache']['mode'] == 'memory' and type(mem['val']).__name__ == 'CacheDataset'
    need = mem['cache']['need_bytes']
    assert need == 4 * 3 * 32**3  # 4 cases of 32³ at the phantoms' own 0.8 mm, 3 bytes a voxel (float16 image, uint8 label)
    disk = datasets(cases, roi_size=(16, 16, 16), cache_budget_gb=need / 2**30 / 2, cache_dir=tmp_path/'cache')
    assert disk['cache']['mode'] == 'disk' and type(disk['test']).__name__ == 'PersistentDataset'
    first = [disk[k][0] for k in ('val', 'test')]  # computes and writes the cases
    files = {f: f.stat().st_mtime_ns for f in (tmp_path/'cache').rglob('*.pt')}
    assert len(files) == 2
    time.sleep(0.05)
    again = datasets(cases, roi_size=(16, 16, 16), cache_budget_gb=need / 2**30 / 2, cache_dir=tmp_path/'cache')
    second = [again[k][0] for k in ('val', 'test')]
    assert {f: f.stat().st_mtime_ns for f in (tmp_path/'cache').rglob('*.pt')} == files  # read back, not recomputed
    assert all(np.array_equal(a['image'], b['image']) for a, b in zip(first, second))
    other = datasets(cases, roi_size=(16, 16, 16), pixdim=(1.0, 1.0, 1.0), cache_budget_gb=1e-9, cache_dir=tmp_path/'cache')
    assert other['cache']['dir'] != disk['cache']['dir']  # another spacing: another cache
