"""What the reliability work of issue 26 costs: the kit before it (a git worktree at REF) against this checkout, in
interleaved rounds (ABBA), each arm in a fresh process, on the same stores.

Measured in each arm:
1. Tracker, per call: `tracker.log_metric` time in a loop of 20,000 points (what the training loop waits for).
2. Tracker, end to end: 10,000 points logged then `flush()`ed, on the embedded SQLite store and on a loopback
   `mlflow server` (every send now runs under a deadline, on a thread of its own: `config.within`).
3. Artifacts, blocking: the time `log_epoch` holds the loop for an epoch with a 16 MB state (`snapshot` into a
   fallocated slab, staging, job.json written atomically).
4. Artifacts, throughput: 8 such epochs logged and flushed (wall and process CPU seconds).

Run: .venv/bin/python bench/bench_reliability_cost.py [--before REF] [--rounds N]
     (writes bench/results/reliability_cost.json; REF defaults to 47d74c8, the commit before issue 26)
"""
import argparse, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from abba import kit_at, rounds  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE/'results'/'reliability_cost.json'


def measure(server_uri: str, tmp: Path) -> dict:
    "One arm: the kit importable from sys.path[0]"
    import torch
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.artifacts import MLflowArtifactManager
    out = {}
    for name, uri in (('sqlite', None), ('server', server_uri)):
        s = load_settings(settings_file=False, environ={}, store_dir=str(tmp/name), tracking_uri=uri,
                          experiment_name=f"cost-{os.getpid()}")
        tr = MLflowTracker(settings=s)
        with tr.start_run():
            t0 = time.perf_counter()
            for i in range(10_000): tr.log_metric('loss', 1.0 / (i + 1), step=i)
            assert tr.flush() is True
            out[f"tracker_10k_flush_s_{name}"] = time.perf_counter() - t0
        with tr.start_run():
            t0 = time.perf_counter()
            for i in range(20_000): tr.log_metric('lr', 1.0 / (i + 1), step=i)
            out[f"tracker_log_metric_us_{name}"] = (time.perf_counter() - t0) / 20_000 * 1e6
        tr.close()
    s = load_settings(settings_file=False, environ={}, store_dir=str(tmp/'art'), experiment_name='cost')
    c = s.client()
    rid = c.create_run(c.create_experiment(f"cost-art-{os.getpid()}")).info.run_id
    m = MLflowArtifactManager(s, async_upload=True)
    state = {f"w{i}": torch.rand(1_000_000) for i in range(4)}  # 16 MB
    m.log_epoch(0, state, {'val_dice': 0.1}, run_id=rid); m.flush()  # warm: slabs, imports
    blocking, cpu0, t0 = [], time.process_time(), time.perf_counter()
    for e in range(1, 9):
        for v in state.values(): v.add_(0.001)
        t = time.perf_counter(); m.log_epoch(e, state, {'val_dice': 0.1 + e / 100}, run_id=rid)
        blocking.append(time.perf_counter() - t)
    m.flush()
    out['artifacts_log_epoch_ms_median'] = statistics.median(blocking) * 1e3
    out['artifacts_8_epochs_wall_s'] = time.perf_counter() - t0
    out['artifacts_8_epochs_cpu_s'] = time.process_time() - cpu0
    m.close()
    return out


def arm(src: Path, server_uri: str) -> dict:
    env = {**os.environ, 'PYTHONPATH': str(src)}
    r = subprocess.run([sys.executable, __file__, '--arm', str(src), '--server', server_uri], capture_output=True,
                       text=True, env=env)
    if r.returncode: raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(ref: str, n: int) -> dict:
    sys.path.insert(0, str(HERE.parent/'tests'))
    from servers import MlflowServer
    show = lambda r, name, x: print(f"round {r} {name}: " + ', '.join(f"{k} {v:.4g}" for k, v in x.items()), flush=True)
    with tempfile.TemporaryDirectory() as t, MlflowServer(Path(t)/'srv') as srv, kit_at(ref) as (commit, old):
        runs = rounds(lambda src: arm(src, srv.uri), old, n, show)
    keys = list(runs['after'][0])
    ratio = {k: [round(a[k] / b[k], 3) for a, b in zip(runs['after'], runs['before'])] for k in keys}
    med = lambda name, k: round(statistics.median(x[k] for x in runs[name]), 4)
    return dict(before=commit, rounds=n, order='ABBA: before, after / after, before, alternating',
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
                median={k: dict(before=med('before', k), after=med('after', k)) for k in keys},
                after_over_before_per_round=ratio,
                after_over_before_median={k: statistics.median(v) for k, v in ratio.items()},
                runs=runs)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--arm'); ap.add_argument('--server'); ap.add_argument('--before', default='47d74c8')
    ap.add_argument('--rounds', type=int, default=3)
    a = ap.parse_args()
    if a.arm:
        sys.path.insert(0, a.arm)
        with tempfile.TemporaryDirectory() as t: print(json.dumps(measure(a.server, Path(t))))
    else:
        res = compare(a.before, a.rounds)
        OUT.write_text(json.dumps(res, indent=2) + '\n'); print(json.dumps(res['after_over_before_median'], indent=1))
        print(f"wrote {OUT}")
