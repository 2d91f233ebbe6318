"""Issue 14, loop overhead: where an epoch's CPU goes, thread by thread, while the kit's `train()` runs with full
tracking on the same phantoms and settings as bench_train.py. A sampler reads each thread's CPU time (utime + stime
from /proc/self/task/*/stat, Linux) every 0.2 s; the report is CPU seconds per epoch for the training thread, torch's
intra-op workers, and each of the kit's background threads (epoch logger: curves, overlay, volumes; uploader: hashing,
compression, store writes; hash threads; tracker queue: metric batches).

With --before REF, the same profile is taken of the kit as committed at REF (a git worktree) and of this checkout,
each in a fresh process, in interleaved rounds (ABBA order), and the report gives both and their ratio per round.

Run: .venv/bin/python bench/bench_threads.py [--before REF] [--rounds N]   (writes bench/results/threads.json)
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from abba import kit_at, rounds  # noqa: E402
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE/'results'/'threads.json'
TICK = os.sysconf('SC_CLK_TCK')
KIT = ('coronary-epoch-logger', 'coronary-mlops-artifacts', 'coronary-mlops-hash', 'coronary-mlops-tracker')


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


def measure(epochs=8) -> dict:
    "Profile one `train()` in this process; the kit is whichever `coronary_mlops` sys.path finds first"
    import torch
    sys.path.insert(1, str(HERE))
    import bench_train as T
    from coronary_mlops.data import CT_WINDOW, generate_phantoms
    from coronary_mlops.train import TrainConfig
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
    order = sorted(groups.items(), key=lambda kv: -kv[1])
    background = sum(v for k, v in groups.items() if k in KIT)
    return dict(kit=str(Path(sys.modules['coronary_mlops'].__file__).parent.parent), epochs=epochs,
                wall_s=round(wall, 2), process_cpu_s=round(cpu, 2),
                epoch_s_median=round(sorted(per_epoch[1:])[len(per_epoch[1:]) // 2], 3),
                kit_background_cpu_s_per_epoch=round(background / epochs, 4),
                kit_background_share=round(background / cpu, 4),
                cpu_s_per_epoch={k: round(v / epochs, 4) for k, v in order},
                share_of_process_cpu={k: round(v / cpu, 4) for k, v in order},
                note="a thread is named by its Python name (numbers dropped); threads Python did not start are "
                     "torch's intra-op workers and allocator threads; kit background = " + ', '.join(KIT))


def arm(src: Path) -> dict:
    "One profile in a fresh process, with the kit from checkout `src`"
    r = subprocess.run([sys.executable, __file__, '--arm', str(src)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(ref: str, n: int) -> dict:
    def show(r, name, x):
        print(f"round {r} {name}: kit background {x['kit_background_cpu_s_per_epoch'] * 1e3:.1f} ms CPU per epoch "
              f"({x['kit_background_share']:.2%} of process CPU), epoch {x['epoch_s_median']} s", flush=True)
    with kit_at(ref) as (commit, old): runs = rounds(arm, old, n, show)
    per = lambda k: [round(a[k] / b[k], 3) for a, b in zip(runs['after'], runs['before'])]
    med = lambda name, k: statistics.median(x[k] for x in runs[name])
    return dict(before=commit, rounds=n, order='ABBA: before, after / after, before, alternating',
                background_ms_per_epoch=dict(before=round(med('before', 'kit_background_cpu_s_per_epoch') * 1e3, 1),
                                             after=round(med('after', 'kit_background_cpu_s_per_epoch') * 1e3, 1)),
                background_share=dict(before=med('before', 'kit_background_share'),
                                      after=med('after', 'kit_background_share')),
                after_over_before_per_round=per('kit_background_cpu_s_per_epoch'),
                epoch_s_after_over_before_per_round=per('epoch_s_median'),
                runs=runs)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--arm'); ap.add_argument('--before'); ap.add_argument('--rounds', type=int, default=3)
    a = ap.parse_args()
    if a.arm:
        sys.path.insert(0, a.arm)
        print(json.dumps(measure()))
    else:
        res = compare(a.before, a.rounds) if a.before else measure()
        OUT.write_text(json.dumps(res, indent=2) + '\n'); print(json.dumps(res, indent=1)[:3000]); print(f"wrote {OUT}")
