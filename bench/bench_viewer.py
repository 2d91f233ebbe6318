"""Slice viewer redraw: the time a slider move costs on a full-size CTA (target < 50 ms on a 512 x 512 slice).

A 512 x 512 x 250 int16 CT (a body of soft tissue with noise, 0.4 x 0.4 x 0.5 mm) with a label and a prediction
(three tubes each) is opened in `SliceViewer` once; then, for each axis, the slice slider is moved 40 times to
random slices, and each move's redraw (slice, window, blend, PNG) is timed with perf_counter and process CPU time.
Nothing reaches a browser here: the time to send the PNG over the kernel's websocket is not included.

Run: .venv/bin/python bench/bench_viewer.py   (writes bench/results/viewer.json; under a minute)
"""
import json, os, platform, time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent/'results'/'viewer.json'
MOVES = 40


def main():
    from coronary_mlops.panels import SliceViewer
    rng = np.random.default_rng(0)
    shape = (512, 512, 250)
    x, y = np.ogrid[:512, :512]
    body = ((x - 256) / 230.0) ** 2 + ((y - 256) / 180.0) ** 2 < 1
    ct = np.where(body, 40, -1000).astype(np.int16)[..., None] + rng.normal(0, 20, shape).astype(np.int16)
    label, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for k in range(3):
        cx, cy = 200 + 50 * k, 240 + 10 * k
        tube = ((x - cx) ** 2 + (y - cy) ** 2 < 16)[..., None]
        label |= np.broadcast_to(tube, shape); pred |= np.broadcast_to(np.roll(tube, 2, axis=0), shape)
    t0 = time.perf_counter()
    v = SliceViewer(ct, label, pred, spacing=(0.4, 0.4, 0.5), title='bench')
    open_s = time.perf_counter() - t0
    rows = {}
    for axis in ('axial', 'coronal', 'sagittal'):
        v.axis.value = axis
        wall, cpu = [], []
        for i in rng.integers(0, v.index.max + 1, MOVES):
            if int(i) == v.index.value: i = (int(i) + 1) % (v.index.max + 1)
            t, c = time.perf_counter(), time.process_time()
            v.index.value = int(i)  # the observer redraws synchronously
            wall.append((time.perf_counter() - t) * 1e3); cpu.append((time.process_time() - c) * 1e3)
        rows[axis] = dict(slice_shape=list(np.take(ct, 0, axis={'axial': 2, 'coronal': 1, 'sagittal': 0}[axis]).T.shape),
                          wall_ms_median=round(float(np.median(wall)), 1), wall_ms_p90=round(float(np.percentile(wall, 90)), 1),
                          cpu_ms_median=round(float(np.median(cpu)), 1), png_kb=round(len(v.img.value) / 1024, 1))
    result = dict(benchmark='viewer', volume=list(shape), moves_per_axis=MOVES, open_s=round(open_s, 3), axes=rows,
                  target_ms=50, within_target=all(r['wall_ms_p90'] < 50 for r in rows.values()),
                  machine=dict(python=platform.python_version(), cpus=os.cpu_count()),
                  command='.venv/bin/python bench/bench_viewer.py')
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
