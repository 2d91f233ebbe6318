"""Inference options measured (issue 25, part 5): for 3 seeds, a small U-Net trained on phantoms, then scored on 8
held-out phantoms with each option, on each case's own grid:

- constant blending at overlap 0.25 (MONAI's defaults, the kit's before) against Gaussian at 0.5 (nnU-Net's, now);
- with and without mirror test-time augmentation (8 flips);
- with and without the small-piece removal that training chose on validation.

Each option's mean Dice, clDice, Betti-0 error and HD95, and its wall and process CPU time per case. Then `predict`'s
time and peak memory for one 512×512×250 scan at 0.4×0.4×0.5 mm on the CPU, in a fresh process per option.

Run: .venv/bin/python bench/bench_inference.py   (about 25 minutes on 2 cores; writes bench/results/inference.json)
     .venv/bin/python bench/bench_inference.py --quick   (one seed, 3 epochs, no full-size scan: a smoke test)
"""
import json, os, platform, subprocess, sys, tempfile, time
from dataclasses import replace
from pathlib import Path
import numpy as np

OUT = Path(__file__).parent/'results'/'inference.json'
OPTIONS = {  # name: Preprocessing fields
    'constant@0.25': dict(mode='constant', overlap=0.25),
    'gaussian@0.5': dict(mode='gaussian', overlap=0.5),
    'gaussian@0.5+tta': dict(mode='gaussian', overlap=0.5, tta=True),
    'gaussian@0.5+pp': dict(mode='gaussian', overlap=0.5, postprocess=True),
    'gaussian@0.5+tta+pp': dict(mode='gaussian', overlap=0.5, tta=True, postprocess=True),
}
METRICS = ('dice', 'cldice', 'betti0_error', 'hd95_mm')


QUICK = '--quick' in sys.argv


def trained(seed: int, work: Path):
    "A small U-Net trained on 20 phantoms (10 train, 2 validation, 8 held out), and its run's result"
    from coronary_mlops.config import load_settings
    from coronary_mlops.train import TrainConfig, train
    from coronary_mlops.tracker import MLflowTracker
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(work/'store'), experiment_name='bench'))
    cfg = TrainConfig(epochs=3 if QUICK else 40, seed=seed, channels=(8, 16, 32), strides=(2, 2), roi_size=(48, 48, 48),
                      fractions=(0.5, 0.1, 0.4), patience=40, learning_rate=1e-2)
    res = train(cfg, synthetic=20, tracker=tr, work_dir=work/'train', progress=False)
    split = json.loads((work/'train'/'split.json').read_text())
    tr.close()
    return res, split['test'], cfg, tr


def score(res, cases, tracker) -> dict:
    """Mean metrics and time per case of the run's model with each option, interleaved: each case goes through every
    option in turn, the order rotating from case to case, so no option always runs first (cold) or last"""
    from coronary_mlops.evaluate import evaluate_cases
    from coronary_mlops.predict import load_segmenter
    segs, chosen = {}, None
    for n, opts in OPTIONS.items():
        seg = segs[n] = load_segmenter(res.segmenter_uri, tracker.settings, device='cpu')
        chosen = seg.prep.min_component_mm3
        fields = {k: v for k, v in opts.items() if k != 'postprocess'}
        seg.prep = replace(seg.prep, **fields, min_component_mm3=chosen if opts.get('postprocess') else 0.0)
    rows, wall, cpu, names = {n: [] for n in OPTIONS}, dict.fromkeys(OPTIONS, 0.0), dict.fromkeys(OPTIONS, 0.0), list(OPTIONS)
    for i, case in enumerate(cases):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            rows[n] += evaluate_cases(segs[n], [case], progress=False)
            wall[n] += time.perf_counter() - t; cpu[n] += time.process_time() - c
    return {n: dict(**{k: round(float(np.nanmean([r[k] for r in rows[n]])), 4) for k in METRICS},
                    wall_s_per_case=round(wall[n] / len(cases), 3), cpu_s_per_case=round(cpu[n] / len(cases), 3),
                    min_component_mm3=segs[n].prep.min_component_mm3) for n in OPTIONS}


FULL = """
import json, resource, sys, time, numpy as np
from coronary_mlops.predict import Preprocessing, Segmenter, unet
opts = json.loads(sys.argv[2])
net = unet((16, 32, 64, 128), (2, 2, 2), 1)
seg = Segmenter(net, Preprocessing(pixdim=(0.8, 0.8, 0.8), roi_size=(96, 96, 96), **opts), device='cpu')
t, c = time.perf_counter(), time.process_time()
r = seg(sys.argv[1])
print(json.dumps(dict(wall_s=round(time.perf_counter() - t, 1), cpu_s=round(time.process_time() - c, 1),
                      peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      shape=list(r['mask'].shape))))
"""


def full_size(work: Path) -> dict:
    "`Segmenter` on one 512×512×250 CT (0.4×0.4×0.5 mm) with the kit's default U-Net and a 96³ window, per option"
    import nibabel as nib
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(512) - 256, np.arange(512) - 256, indexing='ij')
    hu = np.where(x**2 + (y / 0.8)**2 < 230**2, 40, -1000).astype(np.int16)[..., None].repeat(250, 2)
    hu = hu + rng.integers(-30, 31, hu.shape, dtype=np.int16)
    path = work/'full.nii.gz'; nib.save(nib.Nifti1Image(hu, np.diag([0.4, 0.4, 0.5, 1.0])), str(path))
    out = {}
    for name in ('constant@0.25', 'gaussian@0.5'):
        r = subprocess.run([sys.executable, '-c', FULL, str(path), json.dumps(OPTIONS[name])], capture_output=True,
                           text=True, check=True)
        out[name] = json.loads(r.stdout.strip().splitlines()[-1]); print('full size', name, out[name], flush=True)
    return out


if __name__ == '__main__':
    from tqdm.auto import tqdm
    work = Path(tempfile.mkdtemp(prefix='bench-inference-'))
    seeds = {}
    for seed in tqdm(range(1 if QUICK else 3), desc='seeds'):
        res, cases, cfg, tr = trained(seed, work/f"seed{seed}")
        from coronary_mlops.tracker import MLflowTracker
        tr = MLflowTracker(settings=tr.settings)
        seeds[seed] = dict(best_val_dice=round(res.best_dice, 4), test_cases=len(cases),
                           chosen_min_component_mm3=res.preprocessing.get('min_component_mm3'),
                           options=score(res, cases, tr))
        tr.close()
        print(seed, json.dumps(seeds[seed], indent=1), flush=True)
    summary = {}
    for n in OPTIONS:
        rows = [s['options'][n] for s in seeds.values()]
        summary[n] = {k: dict(mean=round(float(np.nanmean([r[k] for r in rows])), 4),
                              sd=round(float(np.nanstd([r[k] for r in rows])), 4))
                      for k in (*METRICS, 'wall_s_per_case', 'cpu_s_per_case')}
    base = summary['constant@0.25']
    ratios = {n: dict(time=round(summary[n]['cpu_s_per_case']['mean'] / base['cpu_s_per_case']['mean'], 2),
                      dice_gain=round(summary[n]['dice']['mean'] - base['dice']['mean'], 4))
              for n in OPTIONS}
    res = dict(setup="3 seeds x (U-Net (8,16,32), 40 epochs on 10 phantoms of 64^3, 2 for validation), each scored on "
                     "8 held-out phantoms on their own grid", seeds=seeds, summary=summary,
               cpu_time_ratio_and_dice_gain_vs_constant_0_25=ratios, full_size_512x512x250=None if QUICK else full_size(work),
               command='.venv/bin/python bench/bench_inference.py',
               machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only")
    if QUICK: print(json.dumps(res, indent=1)); sys.exit()
    OUT.write_text(json.dumps(res, indent=2) + '\n'); print(f"wrote {OUT}")
