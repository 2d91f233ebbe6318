"Break-it tests (issue 29 change): steps per epoch, the CPU patch cap, non-square patches, fresh run names, machine params, UTC times, docs links"
import json, math, os, random, re, sys
from pathlib import Path
from types import SimpleNamespace
import pytest, torch
from conftest import ROOT
from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
from coronary_mlops.data import PhantomConfig, discover, generate_phantoms, transforms
from coronary_mlops.plan import CPU_PATCH_VOXELS, CPU_STEPS, CUDA_STEPS, TrainConfig, plan_patch, plan_run
from coronary_mlops.storage import epoch_summary, utc_time
from coronary_mlops.train import fresh_run_name, make_loaders, train

NET = dict(channels=(4, 8), strides=(2,))
TINY = dict(roi_size=(16, 16, 16), samples_per_case=1, batch_size=1, postprocess=False, **NET)
PHANTOM = PhantomConfig(shape=(32, 32, 32))


def _hist(tr, run_id, key):
    return sorted(((m.step, m.value) for m in tr.client.get_metric_history(run_id, key)))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "A few tiny phantom trainings shared by the tests below (each is ~10 s on the CPU)"
    before = {k: v for k, v in os.environ.items() if k.startswith('MLFLOW_')}
    d = tmp_path_factory.mktemp('break-train')
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(d/'store'), experiment_name='break'))
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, seed=7, **TINY)
    kw = dict(synthetic=4, tracker=tr, phantom=PHANTOM, progress=False)
    a = train(cfg, work_dir=d/'a', **kw)
    b = train(cfg, work_dir=d/'b', **kw)
    name_b = tr.client.get_run(b.run_id).info.run_name
    hist_b_before = _hist(tr, b.run_id, 'train/loss')
    b2 = train(TrainConfig(epochs=1, steps_per_epoch=3, seed=7, **TINY), work_dir=d/'b', resume=b.run_id, **kw)
    p = train(TrainConfig(epochs=1, seed=7, **TINY), work_dir=d/'p', run_name='my-own-name', **kw)  # steps unset
    yield SimpleNamespace(tr=tr, cfg=cfg, a=a, b=b, b2=b2, p=p, name_b=name_b, hist_b_before=hist_b_before)
    for k in [k for k in os.environ if k.startswith('MLFLOW_') and k not in before]: del os.environ[k]
    os.environ.update(before)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('bt-data')/'data'
    generate_phantoms(3, d, config=PhantomConfig(shape=(32, 32, 24), spacing=(0.6, 0.6, 0.9)), progress=False)
    return d


# --- 1. steps_per_epoch ---------------------------------------------------------------------------------------

def test_steps_above_the_number_of_cases_give_exactly_that_many_steps_and_the_param(runs):
    "2 training cases, 3 steps an epoch, 2 epochs: 6 optimiser steps 0..5, param steps_per_epoch=3"
    tr, a = runs.tr, runs.a
    assert [s for s, _ in _hist(tr, a.run_id, 'train/loss')] == list(range(6))
    p = tr.client.get_run(a.run_id).data.params
    assert p['steps_per_epoch'] == '3' and p['cases.train'] == '2'


def test_lr_is_constant_within_an_epoch_and_follows_the_cosine_per_epoch(runs):
    tr, a, lr = runs.tr, runs.a, runs.cfg.learning_rate
    lrs = [v for _, v in _hist(tr, a.run_id, 'train/lr')]
    assert lrs[:3] == pytest.approx([lr] * 3) and lrs[3:] == pytest.approx([lr / 2] * 3)  # T_max = 2 epochs
    assert [v for _, v in _hist(tr, a.run_id, 'lr')] == pytest.approx([lr, lr / 2])


def test_same_seed_same_losses_but_different_run_names(runs):
    tr = runs.tr
    la = [v for _, v in _hist(tr, runs.a.run_id, 'train/loss')]
    assert la == pytest.approx([v for _, v in runs.hist_b_before], rel=1e-5)
    na = tr.client.get_run(runs.a.run_id).info.run_name
    assert na != runs.name_b and re.fullmatch(r'[a-z]+-[a-z]+-\d+', na)


def test_resume_with_steps_continues_the_step_counter_and_keeps_the_name(runs):
    tr, b = runs.tr, runs.b
    assert runs.b2.run_id == b.run_id and [h['epoch'] for h in runs.b2.history] == [2]
    hist = _hist(tr, b.run_id, 'train/loss')
    assert [s for s, _ in hist] == list(range(9))  # 6 before, 3 after: no gap, no repeat
    assert hist[:6] == runs.hist_b_before  # the earlier steps untouched
    assert tr.client.get_run(b.run_id).info.run_name == runs.name_b


def test_phantom_run_logs_a_number_of_steps_not_None(runs):
    "steps unset on phantoms plans one pass: 2 training cases, batch 1 -> 2 steps; the param says so (or 0 = one pass)"
    tr, p = runs.tr, runs.p
    assert len(_hist(tr, p.run_id, 'train/loss')) == 2
    assert tr.client.get_run(p.run_id).data.params['steps_per_epoch'] in ('2', '0')


def test_a_given_run_name_is_kept(runs):
    assert runs.tr.client.get_run(runs.p.run_id).info.run_name == 'my-own-name'


def _fake_ds(n=2):
    return {'train': [{'i': torch.tensor(i)} for i in range(n)], 'val': [{'i': torch.tensor(0)}]}


def test_make_loaders_steps_n1_batch_above_cases_zero_and_seeded_draws():
    ds = _fake_ds(2)
    one = make_loaders(ds, TrainConfig(steps_per_epoch=1, batch_size=2, **NET))
    assert [len(b['i']) for b in one.train] == [2]
    big = make_loaders(ds, TrainConfig(steps_per_epoch=4, batch_size=3, **NET))  # batch 3 > 2 cases
    e1, e2 = [b['i'].tolist() for b in big.train], [b['i'].tolist() for b in big.train]
    assert [len(b) for b in e1] == [3] * 4 and e1 != e2  # 4 steps of 3; a new draw each epoch
    again = make_loaders(ds, TrainConfig(steps_per_epoch=4, batch_size=3, **NET))
    assert [b['i'].tolist() for b in again.train] == e1  # same seed, same draws
    assert len(list(make_loaders(ds, TrainConfig(steps_per_epoch=0, batch_size=3, **NET)).train)) == 1  # one pass


def test_negative_steps_are_refused():
    with pytest.raises(ValueError, match='steps_per_epoch'): TrainConfig(steps_per_epoch=-1)
    assert TrainConfig(steps_per_epoch=0).steps_per_epoch == 0


def test_set_path_on_a_data_folder_also_gets_planned_steps(data_dir):
    cases = discover(data_dir)
    cfg = TrainConfig(roi_size=(16, 16, 16), pixdim=(1.0, 1.0, 1.0), window=(-100.0, 600.0), **NET)
    cpu, plan = plan_run(cfg, cases, None, 'cpu')
    assert plan['source'] == 'set' and cpu.steps_per_epoch == CPU_STEPS
    assert plan_run(cfg, cases, None, 'cuda')[0].steps_per_epoch == CUDA_STEPS  # decided by the device named
    from dataclasses import replace
    assert plan_run(replace(cfg, steps_per_epoch=0), cases, None, 'cpu')[0].steps_per_epoch == 0  # set wins
    assert plan_run(replace(cfg, steps_per_epoch=7), cases, None, 'cuda')[0].steps_per_epoch == 7


def _cli(clean_env, monkeypatch, *args):
    from coronary_mlops.cli import main
    monkeypatch.chdir(clean_env)  # no settings.ini above
    return main(['--store-dir', str(clean_env/'store'), *args])


def test_cli_plan_prints_the_epoch_line(clean_env, monkeypatch, capsys, data_dir):
    assert _cli(clean_env, monkeypatch, 'plan', '--data', str(data_dir), '--device', 'cpu', '--quiet', *sum(
        [['--channels', '4,8'], ['--strides', '2']], [])) == 0
    out = capsys.readouterr().out
    assert re.search(rf'^epoch    : {CPU_STEPS} steps of 2 cases × 4 patches; early stopping after 10 ', out, re.M), out
    assert _cli(clean_env, monkeypatch, 'plan', '--data', str(data_dir), '--device', 'cpu', '--quiet',
                '--steps-per-epoch', '3', '--roi', '16', '--channels', '4,8', '--strides', '2') == 0
    assert re.search(r'^epoch    : 3 steps of 2 cases', capsys.readouterr().out, re.M)


def test_cli_plan_with_negative_steps_is_a_clean_error(clean_env, monkeypatch, capsys, data_dir):
    "As `train` does (exit 2, one line), `plan` should refuse --steps-per-epoch -1 without a traceback"
    rc = _cli(clean_env, monkeypatch, 'plan', '--data', str(data_dir), '--device', 'cpu', '--quiet',
              '--steps-per-epoch', '-1')
    assert rc == 2 and 'steps_per_epoch must be 0 or more' in capsys.readouterr().err


def test_cli_train_with_negative_steps_is_a_clean_error(clean_env, monkeypatch, capsys):
    rc = _cli(clean_env, monkeypatch, 'train', '--synthetic', '3', '--steps-per-epoch', '-1')
    assert rc == 2 and 'steps_per_epoch must be 0 or more' in capsys.readouterr().err


# --- 2. plan_patch's CPU cap ----------------------------------------------------------------------------------

def test_plan_patch_cap_anisotropic_shrinks_the_long_sides_only():
    cfg = TrainConfig(channels=(4, 8), strides=(2, 2), batch_size=1, samples_per_case=1)
    r = plan_patch((300, 300, 30), (1, 1, 1), cfg, 2**40, max_voxels=CPU_PATCH_VOXELS)['roi_size']
    assert math.prod(r) <= CPU_PATCH_VOXELS and all(x % 4 == 0 for x in r)
    assert r[2] == 28 and r[0] == r[1] and math.prod((r[0] + 4, r[1], r[2])) > CPU_PATCH_VOXELS  # as large as fits
    small = plan_patch((40, 40, 40), (1, 1, 1), cfg, 2**40, max_voxels=CPU_PATCH_VOXELS)['roi_size']
    assert small == (40, 40, 40)  # the median case under the cap: the whole case


def test_plan_patch_tiny_cap_never_goes_below_what_TrainConfig_accepts():
    cfg = TrainConfig(batch_size=1, samples_per_case=1, **NET)
    r = plan_patch((100, 100, 100), (1, 1, 1), cfg, 2**40, max_voxels=1)['roi_size']
    assert all(x % 2 == 0 for x in r)
    TrainConfig(roi_size=r, **NET)  # the planned patch must be a valid one (each side at least 8)


def test_plan_run_on_the_cpu_caps_the_patch(data_dir):
    cfg = TrainConfig(pixdim=(0.2, 0.2, 0.2), window=(-100.0, 600.0), batch_size=1, samples_per_case=1, **NET)
    planned, plan = plan_run(cfg, discover(data_dir), None, 'cpu')
    assert math.prod(planned.roi_size) <= CPU_PATCH_VOXELS and all(x % 2 == 0 for x in planned.roi_size)
    assert planned.steps_per_epoch == CPU_STEPS and plan['planned'] == 'roi_size'


def test_plan_run_with_a_coarse_spacing_gives_a_valid_config(data_dir):
    "A median case of a few voxels (spacing 4 mm) with one stride: the plan must still be a valid TrainConfig"
    cfg = TrainConfig(pixdim=(4.0, 4.0, 4.0), window=(-100.0, 600.0), batch_size=1, samples_per_case=1, **NET)
    planned, _ = plan_run(cfg, discover(data_dir), None, 'cpu')
    assert min(planned.roi_size) >= 8


# --- 3. non-square patches ------------------------------------------------------------------------------------

@pytest.mark.parametrize('roi', [(32, 24, 16), (48, 40, 32)])  # the second is larger than the volume
def test_non_square_patches_always_have_the_roi_shape(data_dir, roi):
    from monai.data import DataLoader, Dataset
    cases = [{k: c[k] for k in ('image', 'label')} for c in discover(data_dir)]
    t = transforms(roi_size=roi, pixdim=(0.6, 0.6, 0.9), window=(-100, 600), num_samples=3)
    for _ in range(12):
        for patch in t(cases[0]):
            assert tuple(patch['image'].shape) == (1, *roi) == tuple(patch['label'].shape)
    dl = DataLoader(Dataset(cases, t), batch_size=2, shuffle=True)
    for _ in range(4):
        for b in dl: assert tuple(b['image'].shape[1:]) == (1, *roi)


# --- 4. fresh_run_name -----------------------------------------------------------------------------------------

def test_fresh_run_name_leaves_the_random_stream_and_differs_under_one_seed():
    random.seed(123); n1 = fresh_run_name(); x = random.random()
    random.seed(123); n2 = fresh_run_name(); y = random.random()
    random.seed(123); z = random.random()
    assert x == y == z and n1 != n2 and re.fullmatch(r'[a-z]+-[a-z]+-\d+', n1)


# --- 5. RunComparison -----------------------------------------------------------------------------------------

def test_comparison_ignores_machine_params_but_lists_real_differences(clean_env):
    from coronary_mlops.comparison import RunComparison
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(clean_env/'store'), experiment_name='cmp'))
    ids = []
    for i, (lr, budget, mem) in enumerate(((1e-3, 12.5, 60.0), (3e-3, 7.9, 9.6))):
        with tr.start_run(run_name=f'r{i}') as run:
            tr.log_params({'learning_rate': lr, 'seed': 42, 'cache': {'budget_gb': budget, 'dir': f'/m{i}/cache',
                           'mode': 'memory'}, 'plan': {'patch_memory_gb': mem, 'source': 'fingerprint'}})
            tr.log_metrics({'val_dice': 0.5 + i / 10}, step=0)
            ids.append(run.run_id)
    c = RunComparison(ids, tracker=tr)
    assert [r[0] for r in c.param_rows] == ['learning_rate']
    assert 'budget_gb' not in c._repr_markdown_() and 'learning_rate' in c._repr_markdown_()


# --- 6. utc_time and the summary's timestamp ---------------------------------------------------------------------

def test_utc_time_values():
    assert utc_time(0) == '1970-01-01 00:00:00 UTC (0 ms)'
    assert utc_time(1763900000000) == '2025-11-23 12:13:20 UTC (1763900000000 ms)'
    assert utc_time(-1000) == '1969-12-31 23:59:59 UTC (-1000 ms)'
    assert utc_time(1999) == '1970-01-01 00:00:01 UTC (1999 ms)'
    assert 'Generated at: 1970-01-01 00:00:00 UTC (0 ms)' in epoch_summary(0, {}, {}, 0)


def test_utc_time_far_future_keeps_the_raw_value_instead_of_failing():
    "A summary must not fail on an odd clock value (e.g. ns given as ms): the raw value is what tools read"
    for ms in (253402300800000, 1763900000000 * 10**6):
        assert f'({ms} ms)' in utc_time(ms)
    assert '(253402300800000 ms)' in epoch_summary(1, {'x': 1.0}, {}, 253402300800000)


def test_docs_example_of_epoch_summary_shows_what_the_code_prints():
    "nbs/api/01b_storage.ipynb's committed output (what the docs page shows) matches the code's output now"
    nb = json.loads((ROOT/'nbs/api/01b_storage.ipynb').read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and 'print(epoch_summary(5' in ''.join(c['source']))
    shown = ''.join(''.join(o.get('text', '')) for o in cell['outputs'])
    now = epoch_summary(5, {'train_loss': 0.15}, {'training_curves': 'visualizations/training_curves/epoch_005/curves.png'},
                        1763900000000, cases=[dict(case='1.img.nii.gz', dice=0.81), dict(case='7.img.nii.gz', dice=0.64)])
    assert shown.rstrip('\n') == now.rstrip('\n')


# --- 7. build_docs._fix_links ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fix():
    sys.path.insert(0, str(ROOT/'tools'))
    import build_docs
    site = 'https://coronary-mlops.github.io/coronary_mlops'
    return lambda t: build_docs._fix_links(t, Path('api/train.html'), Path('api'), site)


def test_source_link_attributes_become_an_html_link(fix):
    t = '[source](https://github.com/o/r/blob/main/a.py#L10){target="_blank" style="float:right; font-size:smaller"}'
    assert fix(t) == ('<a href="https://github.com/o/r/blob/main/a.py#L10" target="_blank" '
                      'style="float:right; font-size:smaller">source</a>')
    site = '[s](https://coronary-mlops.github.io/coronary_mlops/api/plan.html#plan_run){target="_blank"}'
    assert fix(site) == '<a href="plan.html#plan_run" target="_blank">s</a>'  # and localised


def test_private_and_normal_links(fix):
    assert fix('see [`_x`](plan.html#_x) and [`y`](plan.html#y)') == 'see `_x` and [`y`](plan.html#y)'
    normal = '[ext](https://e.com/a) [anchor](#here) [a](u){.cls} {k=v}'
    assert fix(normal) == normal
    assert fix('[plan](05a_plan.ipynb) <a href="05a_plan.ipynb">x</a>') == '[plan](plan.html) <a href="plan.html">x</a>'


def test_nested_brackets_with_attributes_leave_no_attribute_text(fix):
    for t in ('[[x]](https://e.com/a){target="_blank"}', '[`f[0]`](https://e.com/a){target="_blank"}'):
        assert '{target=' not in fix(t), fix(t)


def test_private_link_with_attributes_leaves_no_attribute_text(fix):
    out = fix('[`_x`](plan.html#_x){target="_blank"}')
    assert '{target=' not in out and '`_x`' in out
