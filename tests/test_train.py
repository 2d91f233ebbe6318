"The training loop: resume, bad input through train(), the out-of-memory message, and devices"
import json
from pathlib import Path
import nibabel as nib
import pytest, torch
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
from coronary_mlops.data import DataError, PhantomConfig, generate_phantoms, make_phantom, save_nifti
from coronary_mlops.train import TrainConfig, TrainingOOMError, oom_hint, train

TINY = dict(roi_size=(32, 32, 32), channels=(8, 16, 32), strides=(2, 2), samples_per_case=2)


@pytest.fixture
def tracker(clean_env):
    return MLflowTracker(settings=load_settings(False, store_dir=str(clean_env/'store'), experiment_name='train-tests'))


def test_resume_continues_the_epochs_in_the_same_run(tracker, tmp_path):
    ph = PhantomConfig(shape=(32, 32, 32))
    first = train(TrainConfig(epochs=2, **TINY), synthetic=4, tracker=tracker, work_dir=tmp_path/'w', phantom=ph, progress=False)
    again = train(TrainConfig(epochs=2, **TINY), synthetic=4, tracker=tracker, work_dir=tmp_path/'w', phantom=ph,
                  resume=first.run_id, progress=False)
    assert again.run_id == first.run_id and [h['epoch'] for h in again.history] == [2, 3]
    c = tracker.client
    assert [m.step for m in c.get_metric_history(first.run_id, 'train_loss')] == [0, 1, 2, 3]
    steps = [m.step for m in c.get_metric_history(first.run_id, 'train/loss')]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # the step counter continues too
    assert tracker.get_run_info(first.run_id).status == 'FINISHED'
    assert len(tracker.search_runs()) == 1


def test_bad_input_through_train_is_a_data_error(tracker, tmp_path):
    ph = make_phantom(0, PhantomConfig(shape=(32, 32, 32)))
    for i in range(3):
        save_nifti(ph['image'], ph['spacing'], tmp_path/'multi'/f'{i}.img.nii.gz')
        two = ph['label'].copy(); two[16:] *= 2  # classes 1 and 2 (two trees), refused unless merged
        save_nifti(two if i == 1 else ph['label'], ph['spacing'], tmp_path/'multi'/f'{i}.label.nii.gz')
    with pytest.raises(DataError, match=r'1.label.nii.gz holds 2 classes \[1, 2\]'):
        train(TrainConfig(epochs=1, **TINY), data_dir=tmp_path/'multi', tracker=tracker, progress=False)
    for i in range(3):
        save_nifti(ph['image'], ph['spacing'], tmp_path/'shape'/f'{i}.img.nii.gz')
        save_nifti(ph['label'][:, :, :30] if i == 2 else ph['label'], ph['spacing'], tmp_path/'shape'/f'{i}.label.nii.gz')
    with pytest.raises(DataError, match='Shapes differ'):
        train(TrainConfig(epochs=1, **TINY), data_dir=tmp_path/'shape', tracker=tracker, progress=False)
    assert tracker.search_runs() == []  # data is checked before a run is opened: no empty FAILED runs


def test_oom_message_names_what_to_change():
    msg = oom_hint(TrainConfig(roi_size=(96, 96, 96), batch_size=4), torch.device('cpu'))
    assert 'roi_size=(96, 96, 96)' in msg and '--roi 48,48,48' in msg and '--batch-size 2' in msg
    assert issubclass(TrainingOOMError, MemoryError)


def test_params_and_artifacts_of_a_run(tracker, tmp_path):
    res = train(TrainConfig(epochs=2, **TINY), synthetic=4, tracker=tracker, work_dir=tmp_path/'w',
                phantom=PhantomConfig(shape=(32, 32, 32)), onnx=True, progress=False)
    info = tracker.get_run_info(res.run_id)
    assert json.loads(info.params['roi_size']) == [32, 32, 32] and info.params['device'] in ('cpu', 'cuda')
    assert (info.params['cases.train'], info.params['cases.val'], info.params['cases.test']) == ('2', '1', '1')
    assert {'val_dice', 'val_cldice', 'val_hd95', 'train_loss', 'lr', 'test_dice'} <= set(info.metrics)
    from coronary_mlops import registry
    files = {f.path for f in registry.list_artifacts(res.run_id, recursive=True, tracker=tracker)}
    assert {'data/split.json', 'visualizations/training_curves/epoch_001/curves.png', 'predictions/epoch_001/overlay.png',
            'onnx/model.onnx'} <= files
    split = json.loads(registry.download_artifacts(res.run_id, ['data/split.json'], tmp_path/'dl', tracker=tracker)[0].read_text())
    assert {k: len(v) for k, v in split.items()} == {'train': 2, 'val': 1, 'test': 1}
    import mlflow
    m = mlflow.pytorch.load_model(res.model_uri)
    assert m(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    from coronary_mlops.predict import load_segmenter  # the torch-flavour model carries its preprocessing too
    seg = load_segmenter(res.model_uri, tracker.settings, device='cpu')
    assert seg.prep.roi_size == (32, 32, 32) and seg.prep.pixdim == (0.8, 0.8, 0.8)
    val = split['val'][0]['image']
    assert seg(val)['mask'].shape == nib.load(val).shape
    summary = registry.download_artifacts(res.run_id, ['summaries/epoch_001/summary.md'], tmp_path/'dl',
                                          tracker=tracker)[0].read_text()
    assert '## Cases' in summary and f"| {Path(val).name} |" in summary  # the validation case's row


def test_torchrun_two_processes_log_like_one(clean_env):
    "torchrun with 2 CPU processes (gloo): one run, rank 0 logs, same epochs and metrics as a 1-process run"
    import os, subprocess, sys
    from pathlib import Path
    from mlflow import MlflowClient
    bin_ = Path(sys.executable).parent
    args = ['train', '--synthetic', '4', '--epochs', '2', '--roi', '32']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    one = subprocess.run([str(bin_/'coronary-mlops'), '--experiment', 'one', *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(bin_/'torchrun'), '--standalone', '--nproc_per_node', '2', str(bin_/'coronary-mlops'), '--experiment', 'two', *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('best validation Dice') == 1  # only rank 0 reports
    db = clean_env/'xdg'/'coronary_mlops'/'mlflow.db'
    c = MlflowClient(f'sqlite:///{db}', registry_uri=f'sqlite:///{db}')
    runs = {e: c.search_runs([c.get_experiment_by_name(e).experiment_id]) for e in ('one', 'two')}
    assert len(runs['one']) == 1 and len(runs['two']) == 1
    r1, r2 = runs['one'][0], runs['two'][0]
    assert r1.info.run_name != r2.info.run_name  # two CLI trainings with one seed: two names (issue 29)
    assert r2.info.status == 'FINISHED' and set(r1.data.metrics) == set(r2.data.metrics)
    for key in ('train_loss', 'val_dice', 'val_cldice', 'val_hd95', 'lr'):
        assert [m.step for m in c.get_metric_history(r2.info.run_id, key)] == [m.step for m in c.get_metric_history(r1.info.run_id, key)] == [0, 1]
    # steps per epoch: ceil(training cases per process / batch size); 2 cases, batch 2: one step either way
    n1, n2 = (len(c.get_metric_history(r.info.run_id, 'train/loss')) for r in (r1, r2))
    assert (n1, n2) == (2 * -(-2 // 2), 2 * -(-(-(-2 // 2)) // 2))
    assert c.get_run(r2.info.run_id).data.params['cases.train'] == '2'


def test_a_data_folder_is_planned_from_its_fingerprint_and_the_plan_travels_with_the_model(tracker, tmp_path):
    from coronary_mlops.data import fingerprint, discover
    from coronary_mlops.predict import load_segmenter
    generate_phantoms(3, tmp_path/'data', config=PhantomConfig(shape=(32, 32, 24), spacing=(0.6, 0.6, 0.9)),
                      progress=False)
    res = train(TrainConfig(epochs=1, **TINY), data_dir=tmp_path/'data', tracker=tracker, register=True, progress=False)
    p = tracker.client.get_run(res.run_id).data.params
    fp = fingerprint(discover(tmp_path/'data'), seed=TrainConfig().seed)  # what the run should have planned from
    assert p['plan.source'] == 'fingerprint' and json.loads(p['pixdim']) == [0.6, 0.6, 0.9]
    # a data folder's epoch is a fixed number of optimiser steps (nnU-Net's epoch), planned for the device: the CPU's here
    from coronary_mlops.plan import CPU_STEPS
    assert p['steps_per_epoch'] == str(CPU_STEPS) == str(len(tracker.client.get_metric_history(res.run_id, 'train/loss')))
    assert json.loads(p['window']) == [fp['fg_hu_p00_5'], fp['fg_hu_p99_5']]
    assert json.loads(p['plan.spacing_median']) == [0.6, 0.6, 0.9] and int(p['plan.fg_voxels']) > 0
    name = res.registered.split()[0]  # 'name vN @champion'
    seg = load_segmenter(f"models:/{name}@champion", tracker.settings, device='cpu')
    assert seg.prep.pixdim == (0.6, 0.6, 0.9) and seg.prep.window == (fp['fg_hu_p00_5'], fp['fg_hu_p99_5'])
    assert len(res.cases) == 1 and res.cases[0]['true_ml'] > 0  # the held-out case, scored on its own grid
    # inference at nnU-Net's defaults, and the post-processing chosen on validation, travel with the model too
    assert (seg.prep.overlap, seg.prep.mode, seg.prep.tta) == (0.5, 'gaussian', False)
    choice = json.loads((Path(tracker.client.download_artifacts(res.run_id, 'postprocess/choice.json', str(tmp_path)))
                         ).read_text())
    assert choice['chosen_min_component_mm3'] == seg.prep.min_component_mm3
    assert [r['min_component_mm3'] for r in choice['tried']][0] == 0.0 and len(choice['tried']) > 1
    tags = tracker.client.get_model_version(name, res.registered.split()[1][1:]).tags
    assert {k: json.loads(tags['preprocessing'])[k] for k in ('overlap', 'blend', 'tta', 'min_component_mm3')} == \
        dict(overlap=0.5, blend='gaussian', tta=False, min_component_mm3=seg.prep.min_component_mm3)
