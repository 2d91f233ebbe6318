"""Tracker benchmarks, each a ratio measured side by side in one run, on the embedded SQLite store and on a local
`mlflow server` (SQLite backend, loopback).

1. Per-call cost: `tracker.log_metric` inside a training loop, against `mlflow.log_metric` synchronous and with
   `synchronous=False`. Target: >= 100x cheaper per call than synchronous.
2. End to end: 10,000 points logged and then flushed (`tracker.flush()`), against MLflow's own async logging
   (`mlflow.log_metric(..., synchronous=False)` then `mlflow.flush_async_logging()`). Target: >= 5x faster.

Each measurement is repeated (rounds interleaved so that drift hits both sides alike) and the median is reported.

Run: .venv/bin/python bench/bench_tracker.py   (writes bench/results/tracker.json)
"""
import json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
from servers import MlflowServer  # noqa: E402
from coronary_mlops.config import load_settings  # noqa: E402
from coronary_mlops.tracker import MLflowTracker  # noqa: E402

OUT = Path(__file__).parent/'results'/'tracker.json'
ROUNDS = 3


def settings(root, uri=None):
    return load_settings(settings_file=False, environ={}, store_dir=str(root), tracking_uri=uri, experiment_name='bench')


def per_call_mlflow(s, n, synchronous):
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_experiment('bench')
    with mlflow.start_run():
        t0 = time.perf_counter()
        for i in range(n): mlflow.log_metric('loss', 1.0 / (i + 1), step=i, synchronous=synchronous)
        dt = time.perf_counter() - t0
        if not synchronous: mlflow.flush_async_logging()
    return dt / n


def per_call_tracker(s, n):
    tr = MLflowTracker(settings=s)
    with tr.start_run():
        t0 = time.perf_counter()
        for i in range(n): tr.log_metric('loss', 1.0 / (i + 1), step=i)
        dt = time.perf_counter() - t0
    tr.close()
    return dt / n


def e2e_mlflow_async(s, n):
    mlflow.set_tracking_uri(s.tracking_uri)
    mlflow.set_experiment('bench')
    with mlflow.start_run() as run:
        t0 = time.perf_counter()
        for i in range(n): mlflow.log_metric('loss', 1.0 / (i + 1), step=i, synchronous=False)
        mlflow.flush_async_logging()
        dt = time.perf_counter() - t0
    assert len(mlflow.MlflowClient(s.tracking_uri).get_metric_history(run.info.run_id, 'loss')) == n
    return dt


def e2e_tracker(s, n):
    tr = MLflowTracker(settings=s)
    with tr.start_run() as run:
        t0 = time.perf_counter()
        for i in range(n): tr.log_metric('loss', 1.0 / (i + 1), step=i)
        assert tr.flush()
        dt = time.perf_counter() - t0
    assert len(tr.client.get_metric_history(run.run_id, 'loss')) == n
    tr.close()
    return dt


def bench(s, label):
    res = {k: [] for k in ('sync_s', 'async_s', 'tracker_s', 'e2e_async_s', 'e2e_tracker_s')}
    for r in range(ROUNDS):
        res['sync_s'].append(per_call_mlflow(s, 300, True))
        res['async_s'].append(per_call_mlflow(s, 3000, False))
        res['tracker_s'].append(per_call_tracker(s, 30000))
        res['e2e_async_s'].append(e2e_mlflow_async(s, 10_000))
        res['e2e_tracker_s'].append(e2e_tracker(s, 10_000))
        print(f"{label} round {r + 1}: " + ', '.join(f"{k}={v[-1]:.3g}" for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    return dict(
        store=label, rounds=res, median=med,
        per_call_us=dict(mlflow_sync=med['sync_s'] * 1e6, mlflow_async=med['async_s'] * 1e6, tracker=med['tracker_s'] * 1e6),
        per_call_vs_sync=med['sync_s'] / med['tracker_s'], per_call_vs_async=med['async_s'] / med['tracker_s'],
        e2e_10k_s=dict(mlflow_async=med['e2e_async_s'], tracker=med['e2e_tracker_s']),
        e2e_speedup_vs_async=med['e2e_async_s'] / med['e2e_tracker_s'])


def main():
    os.environ.setdefault('MLFLOW_ENABLE_ASYNC_LOGGING', 'false')
    out = dict(python=platform.python_version(), mlflow=mlflow.__version__, cpus=os.cpu_count(),
               targets=dict(per_call_vs_sync='>= 100', e2e_speedup_vs_async='>= 5'), results=[])
    with tempfile.TemporaryDirectory() as t:
        out['results'].append(bench(settings(Path(t)/'sqlite'), 'sqlite'))
        with MlflowServer(Path(t)/'server') as srv:
            out['results'].append(bench(settings(Path(t)/'client', srv.uri), 'server'))
    for r in out['results']:
        r['meets_targets'] = r['per_call_vs_sync'] >= 100 and r['e2e_speedup_vs_async'] >= 5
        print(f"{r['store']}: per call {r['per_call_us']['tracker']:.2f} us vs sync {r['per_call_us']['mlflow_sync']:.0f} us "
              f"({r['per_call_vs_sync']:.0f}x) and async {r['per_call_us']['mlflow_async']:.0f} us ({r['per_call_vs_async']:.0f}x); "
              f"10k end to end {r['e2e_10k_s']['tracker']:.2f} s vs MLflow async {r['e2e_10k_s']['mlflow_async']:.2f} s "
              f"({r['e2e_speedup_vs_async']:.1f}x)")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print(f"wrote {OUT}")


if __name__ == '__main__': main()
