"""Planned preprocessing against the old fixed 0.8 mm, on thin vessels at real CTA spacing.

An ImageCAS-style folder of phantoms at 0.4 x 0.4 x 0.5 mm whose vessels are 1.0-1.5 mm across (as the smaller
coronary branches are), trained the same way from the same seed, three times:
- planned: `TrainConfig()` with pixdim and window unset, so the run plans them from the data's fingerprint;
- planned spacing, fixed window: what the spacing alone does;
- fixed:   pixdim=(0.8, 0.8, 0.8) and the fixed CT window, the kit's behaviour before planning.
Reported: best validation Dice (on each arm's own resampled grid) and held-out test Dice, clDice and HD95 on each
case's original grid (the same voxels for both arms, so those compare directly), and the seconds each arm took.

Run: .venv/bin/python bench/bench_plan.py   (writes bench/results/plan.json)
"""
import json, math, platform, sys, tempfile, time
from pathlib import Path

import torch
from coronary_mlops.config import load_settings
from coronary_mlops.data import CT_WINDOW, PhantomConfig, generate_phantoms
from coronary_mlops.tracker import MLflowTracker
from coronary_mlops.train import TrainConfig, train

OUT = Path(__file__).parent/'results'/'plan.json'
N, EPOCHS = 10, 20
PHANTOM = PhantomConfig(shape=(96, 96, 80), spacing=(0.4, 0.4, 0.5), radius_mm=0.75, min_radius_mm=0.5)
COMMON = dict(epochs=EPOCHS, roi_size=(48, 48, 48), channels=(16, 32, 64), strides=(2, 2), samples_per_case=4,
              patience=EPOCHS, seed=7)


def main():
    work = Path(tempfile.mkdtemp(prefix='bench-plan-'))
    generate_phantoms(N, work/'data', seed=100, config=PHANTOM)
    tr = MLflowTracker(settings=load_settings(False, store_dir=str(work/'store'), experiment_name='bench-plan'))
    arms = {'planned': TrainConfig(**COMMON),
            'planned_spacing_fixed_window': TrainConfig(**COMMON, window=CT_WINDOW),
            'fixed_0.8mm': TrainConfig(**COMMON, pixdim=(0.8, 0.8, 0.8), window=CT_WINDOW)}
    out = {}
    for name, cfg in arms.items():
        t0 = time.perf_counter()
        res = train(cfg, data_dir=work/'data', tracker=tr, run_name=name, work_dir=work/name)
        p = tr.client.get_run(res.run_id).data.params
        out[name] = dict(pixdim=json.loads(p['pixdim']), window=json.loads(p['window']),
                         best_val_dice=round(res.best_dice, 4),
                         **{k: None if math.isnan(res.test[k]) else round(res.test[k], 4)  # NaN: nothing predicted
                            for k in ('test_dice', 'test_cldice', 'test_hd95')},
                         seconds=round(time.perf_counter() - t0, 1))
        print(name, out[name], file=sys.stderr)
    tr.close()
    result = dict(benchmark='plan', cases=N, epochs=EPOCHS, phantom=dict(shape=PHANTOM.shape, spacing=PHANTOM.spacing,
                  radius_mm=[PHANTOM.min_radius_mm, PHANTOM.radius_mm]), arms=out,
                  test_dice_gain=round(out['planned']['test_dice'] - out['fixed_0.8mm']['test_dice'], 3),
                  machine=dict(python=platform.python_version(), torch=torch.__version__, cpus=torch.get_num_threads(),
                               device='cuda' if torch.cuda.is_available() else 'cpu'),
                  command='.venv/bin/python bench/bench_plan.py')
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__': main()
