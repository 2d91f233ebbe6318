"""How the training defaults learn per CPU minute, on realistic synthetic coronary CTA (`bench/realistic_ct.py`, not the
kit's phantoms): two configurations trained on the same folder for the same budget of process CPU time.

- "today": the defaults before the patch cap: the patch planned from the CPU's memory alone, computed here as
  `plan_patch(extent_mm, pixdim, cfg, patch_memory('cpu'))` with no cap (`max_voxels` made unlimited where the kit
  has it) and passed as `roi_size`, and one pass over the training cases per epoch (`steps_per_epoch=0` where the kit
  has the field);
- "new": `TrainConfig()` as it is now (a patch capped on the CPU and a planned number of steps per epoch, once the kit
  has `TrainConfig.steps_per_epoch` and `plan_patch(max_voxels=...)`; before that, the plain defaults).

Both use the same split fractions (0.6/0.2/0.2), seed, spacing and window (planned by the kit from the data) and
`device='cpu'`. Every run is a fresh process (`--_child`) with its own embedded SQLite MLflow store. A run stops at the
epoch boundary nearest the budget (`--cpu-minutes` of the process's user+system CPU time since `train()` was called,
data checking and caching included), through the `Monitor.stop_requested` that `train` reads after each epoch; the
epoch count (`--epochs`, default 1000) and patience (`--patience`, default 1000) are set so high that the budget ends
every run: the cosine schedule then barely decays (pass `--epochs 30 --patience 10` for the defaults' own schedule,
with the budget as a cap). After each validation: CPU minutes, wall minutes, val Dice/clDice, train loss; at the end
the held-out test metrics the run logged (read back from MLflow: test_dice, test_cldice, test_betti0_error, test_hd95),
the CPU spent after the budget (post-processing choice, model logging, test), and what the run used (roi_size,
steps_per_epoch, patches per step, optimiser steps). Seeds run in rounds, ABBA (today/new, then new/today, ...), so a
shared machine's drift hits both alike.

Run: .venv/bin/python bench/bench_learning.py   (3 rounds x 2 configurations x 10 CPU minutes, plus data, setup and
     test: about 45-60 wall minutes on 2 cores; writes bench/results/learning.json and bench/results/learning.png)
     .venv/bin/python bench/bench_learning.py --quick   (3 cases of 64x64x48 at the default field of view, one round,
     0.4 CPU minute a run: a smoke test; prints the result and writes nothing under bench/results)
"""
import argparse, inspect, json, math, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT, FIG = HERE/'results'/'learning.json', HERE/'results'/'learning.png'
CONFIGS = ('today', 'new')
TEST_KEYS = ('test_dice', 'test_cldice', 'test_betti0_error', 'test_hd95')  # the kit logs HD95 (mm) as test_hd95
NO_CAP = 2 ** 62  # `max_voxels` for "today": no cap


def cpu_seconds() -> float:
    "User + system CPU seconds of this process, its threads and its waited-for children"
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def kit_api() -> dict:
    "Which of the API being added the kit has"
    from coronary_mlops.plan import TrainConfig, plan_patch
    return dict(steps_per_epoch='steps_per_epoch' in TrainConfig.__dataclass_fields__,
                max_voxels='max_voxels' in inspect.signature(plan_patch).parameters)


def today_patch(data: Path, fractions, seed: int, api: dict) -> dict:
    "The patch the defaults planned before the cap: the CPU's memory alone decides (`plan_patch` without a cap)"
    from coronary_mlops.data import discover, fingerprint, plan_preprocessing
    from coronary_mlops.plan import TrainConfig, patch_memory, plan_patch
    cfg = TrainConfig(seed=seed, fractions=tuple(fractions))
    fp = fingerprint(discover(data), seed=cfg.seed)
    pixdim = tuple(plan_preprocessing(fp)['pixdim'])
    p = plan_patch(fp['extent_mm_median'], pixdim, cfg, patch_memory('cpu'),
                   **({'max_voxels': NO_CAP} if api['max_voxels'] else {}))
    return dict(p, roi_size=[int(v) for v in p['roi_size']], pixdim=list(pixdim), extent_mm=fp['extent_mm_median'])


# ---------------------------------------------------------------------------------------------------------- one run
def _budget_monitor(budget_s: float, clock):
    "A `train.Monitor` that asks to stop at the epoch boundary nearest `budget_s` CPU seconds, and stamps each epoch"
    from coronary_mlops.train import Monitor

    class Budget(Monitor):
        def __init__(self):
            self.read, self.filed, self.began, self.ended, self.asked = [], {}, None, None, False

        def begin(self, run_id, epochs): self.began = clock()

        @property
        def stop_requested(self) -> bool:  # `train` reads this once after each epoch (trained, validated, handed over)
            now = clock(); self.read.append(now)
            prev = self.read[-2] if len(self.read) > 1 else (self.began or (0.0, 0.0))
            return self.asked or now[0] + (now[0] - prev[0]) / 2 >= budget_s

        @stop_requested.setter
        def stop_requested(self, v): self.asked = bool(v)

        def epoch(self, m, history, overlay): self.filed[int(m['epoch'])] = clock()  # on the logger thread
        def end(self, result): self.ended = clock()
    return Budget()


def child(spec: dict) -> dict:
    "Train one configuration for the CPU budget in this (fresh) process; what it used and learned"
    for k in list(os.environ):
        if k.startswith(('MLFLOW_', 'CORONARY_MLOPS_')): os.environ.pop(k)
    from mlflow import MlflowClient
    from coronary_mlops.config import load_settings
    from coronary_mlops.layout import TAG_EARLY_STOP, TAG_STOPPED
    from coronary_mlops.tracker import MLflowTracker
    from coronary_mlops.train import TrainConfig, train
    work = Path(spec['work'])
    settings = load_settings(False, environ={}, store_dir=str(work/'store'), experiment_name='bench-learning')
    if not settings.tracking_uri.startswith('sqlite:'): raise SystemExit(f"not an embedded store: {settings.tracking_uri}")
    tracker = MLflowTracker(settings=settings)
    kw = dict(seed=spec['seed'], fractions=tuple(spec['fractions']), epochs=spec['epochs'], patience=spec['patience'])
    if spec['config'] == 'today':
        kw['roi_size'] = tuple(spec['roi_size'])
        if spec['api']['steps_per_epoch']: kw['steps_per_epoch'] = 0
    cfg = TrainConfig(**kw)
    c0, w0 = cpu_seconds(), time.perf_counter()
    clock = lambda: (cpu_seconds() - c0, time.perf_counter() - w0)
    mon = _budget_monitor(60 * spec['cpu_minutes'], clock)
    res = train(cfg, data_dir=spec['data'], tracker=tracker, work_dir=work/'train', device='cpu', progress=False,
                monitor=mon, run_name=f"{spec['config']}-seed{spec['seed']}")
    done = clock()
    tracker.close()
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(res.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    steps = len(client.get_metric_history(res.run_id, 'train/loss'))
    first = res.history[0]['epoch'] if res.history else 0
    curve = []
    for h in res.history:
        i = h['epoch'] - first
        at = mon.read[i] if i < len(mon.read) else mon.filed.get(h['epoch'])
        if 'val_dice' not in h or at is None: continue
        curve.append(dict(epoch=h['epoch'], cpu_min=round(at[0] / 60, 3), wall_min=round(at[1] / 60, 3),
                          val_dice=round(h['val_dice'], 4), val_cldice=round(h.get('val_cldice', math.nan), 4),
                          train_loss=round(h['train_loss'], 4)))
    test = {k: metrics.get(k, metrics.get(k + '_mm', res.test.get(k, math.nan))) for k in TEST_KEYS}
    used = {k: json.loads(params[k]) if params.get(k, '').startswith('[') else params.get(k)
            for k in ('roi_size', 'steps_per_epoch', 'batch_size', 'samples_per_case', 'pixdim', 'window')}
    per_step = None
    try: per_step = int(used['batch_size']) * int(used['samples_per_case'])
    except (TypeError, ValueError): pass
    began, trained = mon.began or (0.0, 0.0), (mon.read[-1] if mon.read else done)
    return dict(config=spec['config'], seed=spec['seed'], run_id=res.run_id, used=dict(
                    used, patches_per_step=per_step, optimiser_steps=steps, epochs=len(res.history),
                    steps_per_epoch_measured=round(steps / max(len(res.history), 1), 2),
                    plan={k: v for k, v in params.items() if k.startswith('plan.patch') or k == 'plan.source'}),
                stopped=tags.get(TAG_STOPPED) or tags.get(TAG_EARLY_STOP) or 'epochs ran out',
                curve=curve, best_val_dice=round(res.best_dice, 4), best_epoch=res.best_epoch,
                test={k: (round(v, 4) if v is not None and math.isfinite(v) else None) for k, v in test.items()},
                test_missing=res.test_missing,
                cpu_min=dict(setup=round(began[0] / 60, 3), training=round(trained[0] / 60, 3),
                             after_training=round((done[0] - trained[0]) / 60, 3), total=round(done[0] / 60, 3)),
                wall_min=dict(training=round(trained[1] / 60, 3), total=round(done[1] / 60, 3)))


# --------------------------------------------------------------------------------------------------------- summary
def _stats(v) -> dict:
    v = np.array([x for x in v if x is not None and math.isfinite(x)], float)
    if not v.size: return dict(n=0)
    return dict(mean=round(float(v.mean()), 4), sd=round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 4),
                min=round(float(v.min()), 4), max=round(float(v.max()), 4), n=int(v.size))


def best_by(curve, minutes) -> float:
    "The best val Dice reached by `minutes` CPU minutes (NaN before the first validation)"
    v = [c['val_dice'] for c in curve if c['cpu_min'] <= minutes]
    return max(v) if v else math.nan


def summarize(runs: list, budget: float) -> dict:
    marks = [round(budget * f, 2) for f in (0.25, 0.5, 0.75, 1.0)]
    out = {}
    for name in CONFIGS:
        rs = [r for r in runs if r['config'] == name]
        if not rs: continue
        out[name] = dict(
            **{k: _stats([r['test'][k] for r in rs]) for k in TEST_KEYS},
            best_val_dice=_stats([r['best_val_dice'] for r in rs]),
            best_val_dice_by_cpu_min={str(m): _stats([best_by(r['curve'], m) for r in rs]) for m in marks},
            validations=_stats([len(r['curve']) for r in rs]), optimiser_steps=_stats([r['used']['optimiser_steps'] for r in rs]),
            training_cpu_min=_stats([r['cpu_min']['training'] for r in rs]),
            setup_cpu_min=_stats([r['cpu_min']['setup'] for r in rs]),
            after_training_cpu_min=_stats([r['cpu_min']['after_training'] for r in rs]),
            roi_size=sorted({tuple(r['used']['roi_size'] or ()) for r in rs}),
            steps_per_epoch=sorted({str(r['used']['steps_per_epoch']) for r in rs}))
    by_seed = {(r['config'], r['seed']): r for r in runs}
    seeds = sorted({s for c, s in by_seed if ('today', s) in by_seed and ('new', s) in by_seed})
    if seeds:  # paired by seed: the same split, initial weights and patches' random stream
        val = lambda c, s, k: math.nan if by_seed[c, s]['test'][k] is None else by_seed[c, s]['test'][k]
        out['new_minus_today_paired'] = {k: _stats([val('new', s, k) - val('today', s, k) for s in seeds])
                                         for k in TEST_KEYS}
    return out


def figure(runs: list, budget: float, path: Path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colours = dict(today='tab:orange', new='tab:blue')
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw=dict(width_ratios=[2.2, 1]))
    for r in runs:
        c = r['curve']
        ax.plot([p['cpu_min'] for p in c], [p['val_dice'] for p in c], '-o', ms=3, lw=1.2, color=colours[r['config']],
                alpha=0.85, label=f"{r['config']} seed {r['seed']} (roi {'x'.join(map(str, r['used']['roi_size'] or []))})")
    ax.axvline(budget, color='grey', ls='--', lw=0.8)
    ax.set_xlabel('process CPU minutes (since train() was called)'); ax.set_ylabel('validation Dice')
    ax.set_ylim(0, 1); ax.grid(alpha=0.3); ax.legend(fontsize=7)
    ax.set_title('validation Dice against CPU minutes')
    keys = ('test_dice', 'test_cldice')
    for i, name in enumerate(CONFIGS):
        for j, k in enumerate(keys):
            v = [r['test'][k] for r in runs if r['config'] == name and r['test'][k] is not None]
            x = j * 3 + i
            bx.scatter([x] * len(v), v, color=colours[name], s=18)
            if v: bx.hlines(np.mean(v), x - 0.3, x + 0.3, color=colours[name])
    bx.set_xticks([0.5, 3.5]); bx.set_xticklabels(['test Dice', 'test clDice']); bx.set_ylim(0, 1); bx.grid(alpha=0.3)
    bx.set_title('held-out test (dots: seeds; bar: mean)')
    fig.tight_layout(); path.parent.mkdir(parents=True, exist_ok=True); fig.savefig(path, dpi=110); plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cpu-minutes', type=float, default=None, help="CPU budget of each run (default 10; --quick 0.4)")
    p.add_argument('--rounds', type=int, default=None, help="rounds (seeds), each today and new (default 3; --quick 1)")
    p.add_argument('--seed', type=int, default=0, help="the first round's training seed")
    p.add_argument('--cases', type=int, default=None, help="cases generated (default 10; --quick 3)")
    p.add_argument('--data-seed', type=int, default=0, help="seed of the generated cases")
    p.add_argument('--data', type=Path, help="use this folder of cases instead of generating one")
    p.add_argument('--fractions', default='0.6,0.2,0.2', help="train, validation and test shares")
    p.add_argument('--epochs', type=int, default=1000, help="TrainConfig.epochs (high: the budget ends the run)")
    p.add_argument('--patience', type=int, default=1000, help="TrainConfig.patience (high: no early stop)")
    p.add_argument('--work', type=Path, help="working folder (default: a new temporary one, kept)")
    p.add_argument('--quick', action='store_true', help="smoke test: 3 cases of 64x64x48, one round, 0.4 CPU min a run")
    p.add_argument('--out', type=Path, default=None, help=f"result JSON (default {OUT.relative_to(HERE.parent)}; "
                   "the figure goes beside it as .png)")
    p.add_argument('--_child', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print('RESULT ' + json.dumps(child(json.loads(a._child))), flush=True); return

    budget = a.cpu_minutes if a.cpu_minutes is not None else (0.4 if a.quick else 10.0)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    n_cases = a.cases if a.cases is not None else (3 if a.quick else 10)  # the kit's split needs 3 cases at least
    fractions = [float(v) for v in a.fractions.split(',')]
    work = a.work or Path(tempfile.mkdtemp(prefix='bench-learning-'))
    work.mkdir(parents=True, exist_ok=True)
    data, t = a.data, time.perf_counter()
    if data is None:
        sys.path.insert(0, str(HERE))
        from realistic_ct import write_folder
        data = work/'data'
        # quick: 64x64x48 over the default field of view (168x168x112 at 0.42x0.42x0.7 mm)
        geo = dict(shape=(64, 64, 48), spacing=(1.1, 1.1, 1.63)) if a.quick else {}
        write_folder(data, n_cases, seed=a.data_seed, **geo)
    cases_info = json.loads((data/'cases.json').read_text())['cases'] if (data/'cases.json').exists() else []
    print(f"data: {data} ({n_cases} cases, {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    api = kit_api()
    today = today_patch(data, fractions, a.seed, api)
    print(f"kit API: {api}; today's patch {today['roi_size']} ({today['gb']} GB of {today['memory_gb']} GB)",
          file=sys.stderr, flush=True)

    runs = []
    for r in range(rounds):
        seed = a.seed + r
        for name in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
            spec = dict(config=name, seed=seed, data=str(data), work=str(work/f"{name}-seed{seed}"), api=api,
                        cpu_minutes=budget, epochs=a.epochs, patience=a.patience, fractions=fractions,
                        roi_size=today['roi_size'] if name == 'today' else None)
            t = time.perf_counter()
            pr = subprocess.run([sys.executable, __file__, '--_child', json.dumps(spec)], stdout=subprocess.PIPE,
                                text=True, timeout=max(1800, 60 * budget * 8))
            line = next((l for l in reversed(pr.stdout.splitlines()) if l.startswith('RESULT ')), None)
            if pr.returncode or line is None:
                raise SystemExit(f"{name} seed {seed} failed (exit {pr.returncode}):\n{pr.stdout[-3000:]}")
            run = json.loads(line[len('RESULT '):]); run['round'] = r; run['order'] = len(runs)
            runs.append(run)
            c = run['curve'][-1] if run['curve'] else {}
            print(f"round {r} {name:5s} seed {seed}: roi {run['used']['roi_size']}, {run['used']['optimiser_steps']} steps "
                  f"in {run['used']['epochs']} epochs, {run['cpu_min']['training']:.1f} CPU min training, last val Dice "
                  f"{c.get('val_dice', math.nan):.3f}, best {run['best_val_dice']:.3f}, test Dice "
                  f"{run['test']['test_dice']}, clDice {run['test']['test_cldice']} "
                  f"({(time.perf_counter() - t) / 60:.1f} wall min)", file=sys.stderr, flush=True)

    import torch
    res = dict(
        benchmark='learning', question="val Dice against process CPU minutes, and held-out test metrics at a fixed CPU "
        "budget: the defaults before the CPU patch cap ('today') against TrainConfig() now ('new')",
        configs=dict(today=f"roi_size={tuple(today['roi_size'])} (plan_patch on patch_memory('cpu') alone, no cap)"
                           + (", steps_per_epoch=0 (one pass over the training cases)" if api['steps_per_epoch'] else
                              ", one pass over the training cases per epoch (the kit has no steps_per_epoch yet)"),
                     new="TrainConfig() defaults" + ("" if all(api.values()) else
                         f" (the kit lacks {[k for k, v in api.items() if not v]}: new = today's defaults planned by "
                         "the kit itself)")),
        kit_api=api, today_patch=today, cpu_minutes_budget=budget, rounds=rounds, seeds=list(range(a.seed, a.seed + rounds)),
        common=dict(fractions=fractions, epochs=a.epochs, patience=a.patience, device='cpu',
                    stop="at the epoch boundary nearest the budget (Monitor.stop_requested); the best checkpoint is tested"),
        data=dict(folder=str(data), generator='bench/realistic_ct.py', cases=n_cases, data_seed=a.data_seed,
                  shape=cases_info[0]['shape'] if cases_info else None,
                  vessel_fraction=_stats([c['vessel_fraction'] for c in cases_info]),
                  orientations={o: sum(c['orientation'] == o for c in cases_info) for o in ('RAS', 'LPS')},
                  storage={s: sum(c['storage'] == s for c in cases_info) for s in {c['storage'] for c in cases_info}}),
        summary=summarize(runs, budget), runs=runs,
        command=' '.join(['.venv/bin/python', 'bench/bench_learning.py', *sys.argv[1:]]),
        machine=dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                     python=platform.python_version(), torch=torch.__version__, torch_threads=torch.get_num_threads()))
    out = a.out or (work/'learning.json' if a.quick else OUT)
    fig = out.with_suffix('.png')
    figure(runs, budget, fig)
    if a.quick: print(json.dumps(res['summary'], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(res, indent=2) + '\n')
    print(f"wrote {out} and {fig}", file=sys.stderr)


if __name__ == '__main__':
    main()
