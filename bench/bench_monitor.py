"""The live view's cost to training: `train()` with `monitor=TrainingMonitor()` against `train()` without one.

Both arms train the same 12 phantoms, model, seed and epochs with full tracking into fresh embedded stores; rounds
interleave the arms. Per-epoch seconds come from the run's own metric timestamps (epochs 2..N; the first carries
one-off costs), and the process's CPU time per run is reported beside them. The monitor is updated as in a notebook
(SVG curves, overlay, stats line), on the loop's logger thread; nothing displays it here, so the time its widgets
take to send their state to a browser is not counted (the kernel sends them on its I/O thread).

Run: .venv/bin/python bench/bench_monitor.py   (writes bench/results/monitor.json; about 10 minutes on 2 cores)
"""
import json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

OUT = Path(__file__).parent/'results'/'monitor.json'
EPOCHS, ROUNDS = 6, 4


def run(cfg, data, root, monitor):
    from coronary_mlops.config import load_settings
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.train import train
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(root), experiment_name='bench'))
    c0 = time.process_time()
    res = train(cfg, data_dir=data, tracker=tr, work_dir=root/'w', progress=False, monitor=monitor)
    cpu = time.process_time() - c0
    ts = sorted(m.timestamp for m in tr.client.get_metric_history(res.run_id, 'train_loss'))
    tr.close()
    return statistics.median([(b - a) / 1000 for a, b in zip(ts[1:], ts[2:])]), cpu


def main():
    from coronary_mlops.data import generate_phantoms
    from coronary_mlops.panels import TrainingMonitor
    from coronary_mlops.train import TrainConfig
    cfg = TrainConfig(epochs=EPOCHS, patience=EPOCHS, roi_size=(48, 48, 48), pixdim=(0.8,) * 3, window=(-200.0, 700.0))
    rows = []
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        generate_phantoms(12, t/'phantoms', seed=cfg.seed * 1000, progress=False)
        for r in range(ROUNDS):
            arms = [('off', None), ('on', TrainingMonitor(show=False))]
            if r % 2: arms.reverse()  # alternate which arm goes first
            row = {}
            for name, mon in arms:
                row[name] = run(cfg, t/'phantoms', t/f'store-{r}-{name}', mon)
                if mon is not None: assert len(mon.history) == EPOCHS and mon.overlay.value[:4] == b'\x89PNG'
            rows.append(row)
            print(f"round {r + 1}: off {row['off'][0]:.3f} s/epoch, on {row['on'][0]:.3f} s/epoch", file=sys.stderr)
    ratio = [r['on'][0] / r['off'][0] for r in rows]
    cpu = [r['on'][1] / r['off'][1] for r in rows]
    result = dict(benchmark='monitor', epochs=EPOCHS, rounds=ROUNDS,
                  s_per_epoch_off=[round(r['off'][0], 3) for r in rows], s_per_epoch_on=[round(r['on'][0], 3) for r in rows],
                  on_over_off_median=round(statistics.median(ratio), 4), on_over_off_range=[round(min(ratio), 4), round(max(ratio), 4)],
                  cpu_on_over_off_median=round(statistics.median(cpu), 4), cpu_on_over_off_range=[round(min(cpu), 4), round(max(cpu), 4)],
                  machine=dict(python=platform.python_version(), cpus=os.cpu_count()),
                  command='.venv/bin/python bench/bench_monitor.py')
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
