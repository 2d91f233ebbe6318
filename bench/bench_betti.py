"""Betti numbers at full size: `evaluate.betti_numbers` on 512×512×250 masks whose bounding box is the whole volume
(a worst case: a real coronary tree's box is smaller), 3 rounds, wall and process CPU time.

Run: .venv/bin/python bench/bench_betti.py   (writes bench/results/betti.json)
"""
import json, os, platform, statistics, time
from pathlib import Path
import numpy as np
from coronary_mlops.evaluate import betti_numbers

OUT = Path(__file__).parent/'results'/'betti.json'


def mask(seed: int) -> np.ndarray:
    "30 thin slabs of 4×120×4 voxels at random places: 30 pieces, spread over the whole volume"
    rng, m = np.random.default_rng(seed), np.zeros((512, 512, 250), bool)
    for _ in range(30):
        x, y, z = rng.integers(50, 450), rng.integers(70, 440), rng.integers(20, 230)
        m[x - 2:x + 2, y - 60:y + 60, z - 2:z + 2] = True
    m[5, 5, 5] = m[506, 506, 245] = True  # the box is the whole volume
    return m


if __name__ == '__main__':
    rows = []
    for seed in range(3):
        m = mask(seed)
        t, c = time.perf_counter(), time.process_time()
        b = betti_numbers(m)
        rows.append(dict(seed=seed, betti=list(b), wall_s=round(time.perf_counter() - t, 3), cpu_s=round(time.process_time() - c, 3)))
        print(rows[-1], flush=True)
    res = dict(shape=[512, 512, 250], rounds=rows, wall_s_median=statistics.median(r['wall_s'] for r in rows),
               cpu_s_median=statistics.median(r['cpu_s'] for r in rows),
               machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only")
    OUT.write_text(json.dumps(res, indent=2) + '\n'); print(f"wrote {OUT}")
