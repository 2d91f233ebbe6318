"""MONAI CacheDataset's copy_cache: a deep copy of each cached case before the random crop, or none.

8 ImageCAS-sized cases (as `bench_data.py` generates them; nothing is downloaded) are cached once in memory by the
kit's `datasets` at 0.8 mm; then epochs over the training loader (random 48³ patches, no model: the loading itself)
alternate between `copy_cache=True` (MONAI's default) and `False` (the kit's choice: its random part, crop then
`ToFloat`, never writes into the cached tensors), 5 rounds after a warm-up.

Run: BENCH_DATA_DIR=/tmp/bd .venv/bin/python bench/bench_copy_cache.py   (writes bench/results/copy_cache.json)
"""
import json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
OUT = Path(__file__).parent/'results'/'copy_cache.json'
N, ROUNDS = 8, 5


def main():
    import torch
    from monai.data import DataLoader
    from bench_data import generate
    from coronary_mlops.data import datasets, discover
    root = Path(os.environ.get('BENCH_DATA_DIR') or tempfile.mkdtemp(prefix='bench-data-'))
    generate(N, root/'imagecas')
    ds = datasets(discover(root/'imagecas')[:N], (48, 48, 48), (0.8, 0.8, 0.8), num_samples=4, fractions=(0.8, 0.1, 0.1),
                  cache_budget_gb=64)['train']
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    def epoch(copy):
        ds.copy_cache = copy
        t0 = time.perf_counter()
        for b in loader: _ = b['image'].shape
        return time.perf_counter() - t0
    epoch(True); epoch(False)
    t = {True: [], False: []}
    for r in range(ROUNDS):
        for copy in ((True, False) if r % 2 == 0 else (False, True)): t[copy].append(epoch(copy))
    ratio = [f / c for c, f in zip(t[True], t[False])]
    res = dict(benchmark='copy_cache', cases=N, train_cases=len(ds), rounds=ROUNDS,
               copy_s=[round(x, 3) for x in t[True]], no_copy_s=[round(x, 3) for x in t[False]],
               no_copy_over_copy_median=round(statistics.median(ratio), 3), range=[round(min(ratio), 3), round(max(ratio), 3)],
               machine=dict(python=platform.python_version(), cpus=os.cpu_count()),
               command='BENCH_DATA_DIR=/tmp/bd .venv/bin/python bench/bench_copy_cache.py')
    OUT.write_text(json.dumps(res, indent=2)); print(json.dumps(res, indent=2))


if __name__ == '__main__': main()
