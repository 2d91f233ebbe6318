"""ArtifactBrowser on a long run: 500 epochs x 10 artifacts in the embedded SQLite store, or behind a server.

Target (issue 6): opening the run and switching epochs each take under 1 s. With `--server` the same run is logged to
and read from `mlflow server` on loopback (SQLite backend, proxied artifacts: every read is HTTP), and the targets
are those of issue 15: under 0.3 s to open, under 0.1 s to switch. Measured side by side in one run against
the eager alternative, which reads every epoch's manifest when the run opens (what a browser that builds the whole
artifact tree up front would do), so the result is also a ratio. Rounds are interleaved and medians reported.

Run: .venv/bin/python bench/bench_panels.py [--server]   (writes bench/results/panels.json or panels_server.json)
"""
import json, platform, random, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coronary_mlops.config import load_settings
from coronary_mlops.panels import ArtifactBrowser, RunArtifacts
from coronary_mlops.tracker import MLflowTracker

OUT = Path(__file__).parent/'results'/'panels.json'
EPOCHS, ROUNDS, SWITCHES = 500, 5, 20


def build_run(tr, work: Path) -> str:
    "500 epochs, each with metrics, metadata and summary (written by the manager) and 7 files of its own: 10 artifacts"
    rng = np.random.default_rng(0)
    with tr.start_run(run_name='long run') as r:
        for ep in tqdm(range(EPOCHS), desc='logging epochs'):
            d = work/f"e{ep}"; d.mkdir(parents=True)
            files = {}
            for i, kind in enumerate(('predictions', 'sample_images', 'logs', 'config', 'comparison', 'metrics_plot', 'model_summary')):
                f = d/f"{kind}.{'txt' if kind in ('logs', 'model_summary') else 'json' if kind == 'config' else 'bin'}"
                if f.suffix == '.bin': f.write_bytes(rng.bytes(2048))
                elif f.suffix == '.json': f.write_text(json.dumps({'epoch': ep, 'values': rng.random(100).tolist()}))
                else: f.write_text('\n'.join(f"epoch {ep} step {i} loss {x:.5f}" for i, x in enumerate(rng.random(60))))
                files[kind] = f
            tr.log_epoch(ep, metrics={'val_dice': float(ep) / EPOCHS, 'train_loss': 1 - float(ep) / EPOCHS}, artifacts=files)
        tr.artifacts.flush()
    return r.run_id


def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0


def main(server=False):
    root = Path(tempfile.mkdtemp(prefix='bench-panels-'))
    srv = None
    if server:
        sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
        from servers import MlflowServer
        srv = MlflowServer(root/'server').start()
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(root/'store'), experiment_name='bench panels',
                                              **({'tracking_uri': srv.uri} if srv else {})))
    t0 = time.perf_counter()
    run_id = build_run(tr, root/'work')
    build_s = time.perf_counter() - t0
    n_files = len(RunArtifacts(run_id, tr).files(0))
    rounds = {'open_lazy': [], 'open_eager': [], 'switch_lazy': [], 'switch_eager': []}
    rng = random.Random(0)
    for _ in range(ROUNDS):
        # lazy: what ArtifactBrowser does (one manifest listing, then the shown epoch)
        holder = {}
        rounds['open_lazy'].append(timed(lambda: holder.update(b=ArtifactBrowser(run_id, tracker=tr))))
        b = holder['b']
        assert b.epoch.value == EPOCHS - 1 and b.run.reads == 1 and b.status.value == '', b.status.value
        eps = rng.sample(range(EPOCHS), SWITCHES)
        per = [timed(lambda e=e: setattr(b.epoch, 'value', e)) for e in eps]
        assert b.status.value == '' and b.run.reads == 1 + SWITCHES
        rounds['switch_lazy'].append(statistics.median(per))
        # eager: every manifest read when the run opens; switching then reads files only
        ra = RunArtifacts(run_id, tr)
        rounds['open_eager'].append(timed(lambda: [ra.manifest(e) for e in ra.epochs]))
        per = [timed(lambda e=e: (ra.metrics(e), ra.local(ra.find(e, 'summary')), ra.files(e))) for e in eps]
        rounds['switch_eager'].append(statistics.median(per))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    res = dict(
        what=f"ArtifactBrowser on one run of {EPOCHS} epochs x {n_files} artifacts, "
             + ("mlflow server on loopback (SQLite backend, proxied artifacts over HTTP)" if srv else "embedded SQLite store"),
        command='.venv/bin/python bench/bench_panels.py' + (' --server' if srv else ''),
        machine=dict(python=platform.python_version(), cpus=__import__('os').cpu_count(), platform=platform.platform()),
        build_run_s=round(build_s, 1), rounds=ROUNDS, switches_per_round=SWITCHES,
        open_run_s=round(med['open_lazy'], 4), switch_epoch_s=round(med['switch_lazy'], 4),
        eager_open_s=round(med['open_eager'], 4), eager_switch_s=round(med['switch_eager'], 4),
        open_speedup_vs_eager=round(med['open_eager'] / med['open_lazy'], 1),
        target='open < 0.3 s, switch < 0.1 s' if srv else 'open and switch each < 1 s',
        met=(med['open_lazy'] < 0.3 and med['switch_lazy'] < 0.1) if srv else (med['open_lazy'] < 1 and med['switch_lazy'] < 1),
        per_round={k: [round(x, 4) for x in v] for k, v in rounds.items()})
    out = OUT.with_name('panels_server.json') if srv else OUT
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + '\n')
    print(json.dumps({k: v for k, v in res.items() if k != 'per_round'}, indent=1))
    tr.close()
    if srv: srv.stop()


if __name__ == '__main__': main(server='--server' in sys.argv)
