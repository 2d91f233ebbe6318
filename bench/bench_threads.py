"""Issue 14, loop overhead: where an epoch's CPU goes, thread by thread, while the kit's `train()` runs with full
tracking on the same phantoms and settings as bench_train.py. A sampler reads each thread's CPU time (utime + stime
from /proc/self/task/*/stat, Linux) every 0.2 s; the report is CPU seconds per epoch for the training thread, torch's
intra-op workers, and each of the kit's background threads (epoch logger: curves, overlay, volumes; uploader: hashing,
compression, store writes; tracker queue: metric batches).

Run: .venv/bin/python bench/bench_threads.py   (writes bench/results/threads.json)
"""
import json, os, re, sys, tempfile, threading, time
from collections import defaultdict
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).parent))
import bench_train as T
from coronary_mlops.data import CT_WINDOW, generate_phantoms
from coronary_mlops.train import TrainConfig

OUT = Path(__file__).parent/'results'/'threads.json'
TICK = os.sysconf('SC_CLK_TCK')


def cpu_by_thread() -> dict:
    "{(tid, name): CPU seconds} for every thread of this process"
    out = {}
    for d in Path('/proc/self/task').iterdir():
        try: stat = (d/'stat').read_text()
        except OSError: continue
        name = stat[stat.index('(') + 1:stat.rindex(')')]
        f = stat[stat.rindex(')') + 2:].split()
        out[(int(d.name), name)] = (int(f[11]) + int(f[12])) / TICK
    return out


def main(epochs=8):
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = TrainConfig(epochs=epochs, patience=epochs, roi_size=(48, 48, 48), pixdim=(0.8, 0.8, 0.8), window=CT_WINDOW)
    seen, names, stop = {}, {}, threading.Event()
    def sample():
        while not stop.is_set():
            names.update({th.native_id: th.name for th in threading.enumerate()})  # Python 3.11 names no OS thread
            for k, v in cpu_by_thread().items(): seen[k] = max(v, seen.get(k, 0))
            time.sleep(0.2)
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        cases = generate_phantoms(12, t/'phantoms', seed=cfg.seed * 1000, progress=False)
        before = cpu_by_thread()
        s = threading.Thread(target=sample, name='bench-sampler', daemon=True); s.start()
        w0, c0 = time.perf_counter(), time.process_time()
        per_epoch, _, total, _ = T.kit_loop(cfg, cases, t/'store')
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        stop.set(); s.join()
    me = threading.get_native_id()
    groups = defaultdict(float)
    for (tid, name), v in seen.items():
        v -= before.get((tid, name), 0)
        if name == 'bench-sampler': continue
        pyname = names.get(tid)
        key = ('training thread' if tid == me else
               re.sub(r'[-_]?\d+(_\d+)?$', '', pyname) if pyname else 'not Python (torch intra-op pool, allocators)')
        groups[key] += v
    res = dict(epochs=epochs, wall_s=round(wall, 2), process_cpu_s=round(cpu, 2),
               epoch_s_median=round(sorted(per_epoch[1:])[len(per_epoch[1:]) // 2], 3),
               cpu_s_per_epoch={k: round(v / epochs, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
               share_of_process_cpu={k: round(v / cpu, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
               note="a thread is named by its Python name (numbers dropped); threads Python did not start are torch's "
                    "intra-op workers and allocator threads")
    OUT.write_text(json.dumps(res, indent=2) + '\n'); print(json.dumps(res, indent=1)); print(f"wrote {OUT}")


if __name__ == '__main__': main()
