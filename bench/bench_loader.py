"""Loading alongside compute: which loader keeps the training step fed, measured with the model in the loop.

On ImageCAS-sized volumes (generated as in `bench_data.py`; nothing is downloaded), 8 cases resampled to 0.8 mm, the
kit's datasets cached in memory and, separately, on disk (PersistentDataset), one training epoch of the kit's default
U-Net (48^3 patches, 2 cases x 4 patches a step, AdamW) is timed for each loader:
- `workers0`: MONAI DataLoader, num_workers=0 (the kit's default): loading and compute take turns;
- `workers2`: num_workers=2 worker processes;
- `thread`: MONAI ThreadDataLoader, num_workers=0: a background thread prefetches the next batch.
Arms are interleaved round by round in one process after a warm-up epoch each; each epoch's wall time and the
process's CPU time are reported, with each arm's ratio to `workers0` per round (median and range).

Run: BENCH_DATA_DIR=/tmp/bd .venv/bin/python bench/bench_loader.py   (writes bench/results/loader.json; ~10 minutes)
"""
import json, os, platform, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
OUT = Path(__file__).parent/'results'/'loader.json'
N, ROUNDS, ROI, SAMPLES, BATCH = 8, 3, (48, 48, 48), 4, 2


def epoch(model, opt, loss_fn, loader) -> tuple[float, float]:
    import torch
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for b in loader:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(b['image']), b['label']); loss.backward(); opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    import torch
    from monai.data import DataLoader, ThreadDataLoader
    from monai.losses import DiceCELoss
    from bench_data import generate
    from coronary_mlops.data import datasets, discover
    from coronary_mlops.train import TrainConfig, build_model
    root = Path(os.environ.get('BENCH_DATA_DIR') or tempfile.mkdtemp(prefix='bench-data-'))
    generate(N, root/'imagecas')
    cases = discover(root/'imagecas')[:N]
    torch.manual_seed(0)
    model, loss_fn = build_model(TrainConfig()), DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    result = dict(benchmark='loader', cases=N, roi=ROI, samples_per_case=SAMPLES, batch_size=BATCH, rounds=ROUNDS,
                  torch_threads=torch.get_num_threads(), caches={})
    for cache in ('memory', 'disk'):
        ds = datasets(cases, ROI, (0.8, 0.8, 0.8), num_samples=SAMPLES, fractions=(0.8, 0.1, 0.1),
                      cache_budget_gb=64 if cache == 'memory' else 2**-10,
                      cache_dir=root/'cache-loader')['train']
        g = lambda: torch.Generator().manual_seed(0)
        loaders = dict(workers0=DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0, generator=g()),
                       workers2=DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2, generator=g(),
                                           persistent_workers=True),
                       thread=ThreadDataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0, generator=g()))
        for name, ld in loaders.items(): epoch(model, opt, loss_fn, ld)  # warm-up: workers start, caches fill
        times = {k: [] for k in loaders}
        for r in range(ROUNDS):
            for name, ld in loaders.items():
                times[name].append(epoch(model, opt, loss_fn, ld))
                print(cache, r, name, [round(x, 2) for x in times[name][-1]], file=sys.stderr, flush=True)
        arms = {}
        for name, ts in times.items():
            ratio = [t[0] / b[0] for t, b in zip(ts, times['workers0'])]
            arms[name] = dict(wall_s=[round(t[0], 2) for t in ts], cpu_s=[round(t[1], 2) for t in ts],
                              wall_median_s=round(float(np.median([t[0] for t in ts])), 2),
                              over_workers0_median=round(float(np.median(ratio)), 3),
                              over_workers0_range=[round(min(ratio), 3), round(max(ratio), 3)])
        result['caches'][cache] = arms
        del loaders
    result['machine'] = dict(python=platform.python_version(), cpus=os.cpu_count())
    result['command'] = 'BENCH_DATA_DIR=/tmp/bd .venv/bin/python bench/bench_loader.py'
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
