"""Training-loop benchmarks, each measured side by side in one run on the same phantoms, model, seed and epochs.

1. Loop overhead: the kit's `train()` with tracking and artifacts on (per-step metrics, per-epoch curves, overlay,
   JSON, summary and best checkpoint) against a bare MONAI loop doing the same training and validation with nothing
   logged. Reported as extra seconds per epoch over the bare epoch time. Target: <= 3%.
   The peer (issue 14): MONAI's SupervisedTrainer + SupervisedEvaluator, bare and with MLFlowHandler (and
   CheckpointSaver for the best model) into an embedded store of the same kind; four ratios per round, and what the
   kit's run and the handler's run hold (metric points, files, bytes).
2. Caching: epoch time with MONAI's CacheDataset against a plain Dataset (which loads and preprocesses every epoch).
3. Reproducibility: two seeded CPU runs give losses equal to rtol 1e-3 and validation Dice equal to 1e-2.
4. GPU (only when CUDA is present): AMP against float32 throughput, and the peak GPU memory.

Run: .venv/bin/python bench/bench_train.py   (writes bench/results/train.json)
"""
import json, os, platform, statistics, sys, tempfile, time
from pathlib import Path

import numpy as np, torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from coronary_mlops.config import load_settings
from coronary_mlops.tracker import MLflowTracker
from coronary_mlops.data import CT_WINDOW, datasets, generate_phantoms
from coronary_mlops.train import TrainConfig, train
from coronary_mlops.plan import build_model, preprocessing
from coronary_mlops.evaluate import evaluate_volumes
from coronary_mlops.distributed import pick_device, amp_dtype

OUT = Path(__file__).parent/'results'/'train.json'
EPOCHS, ROUNDS = 8, 5


def setup(cfg, cases, cache=True):
    "What every bare arm shares with train(): seeded data, loaders, model, loss, AdamW and the cosine schedule"
    set_determinism(cfg.seed); cfg = cfg.planned()  # the phantoms' spacing and window, as train() plans them
    ds = datasets(cases, cfg.roi_size, cfg.pixdim, cfg.seed, cache, cfg.fractions, cfg.samples_per_case, 0)
    dev = pick_device(); amp = amp_dtype(dev, cfg.amp)
    tl = DataLoader(ds['train'], batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    vl = DataLoader(ds['val'], batch_size=1)
    model = build_model(cfg).to(dev); loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return cfg, dev, amp, tl, vl, model, loss_fn, opt, sched


def bare_loop(cfg, cases, cache=True):
    "The same training and validation as train(), with nothing logged; returns per-epoch seconds and the history"
    cfg, dev, amp, tl, vl, model, loss_fn, opt, sched = setup(cfg, cases, cache)
    times, hist = [], []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter(); model.train(); losses = []
        for b in tl:
            x, y = b['image'].to(dev), b['label'].to(dev)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None): loss = loss_fn(model(x), y)
            loss.backward(); opt.step(); losses.append(loss.item())
        sched.step()
        val, _ = evaluate_volumes(model, vl, preprocessing(cfg), dev, amp)
        times.append(time.perf_counter() - t0); hist.append(dict(train_loss=float(np.mean(losses)), **val))
    return times, hist


def monai_loop(cfg, cases, root=None):
    """The peer: MONAI's SupervisedTrainer + SupervisedEvaluator on the same data, model, loss, optimiser, schedule and
    seed; bare, or (with `root`) with MLFlowHandler on both engines and CheckpointSaver for the best model, into an
    embedded SQLite store with a local artifact folder. Returns per-epoch seconds (training and validation)"""
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import (CheckpointSaver, HausdorffDistance, LrScheduleHandler, MeanDice, MLFlowHandler,
                                ValidationHandler, from_engine)
    from monai.inferers import SimpleInferer, SlidingWindowInferer
    from monai.transforms import AsDiscreted, Compose
    cfg, dev, amp, tl, vl, model, loss_fn, opt, sched = setup(cfg, cases)
    post = Compose([AsDiscreted(keys='pred', argmax=True, to_onehot=2), AsDiscreted(keys='label', to_onehot=2)])
    pl = from_engine(['pred', 'label'])
    val_handlers, train_handlers = [], [LrScheduleHandler(sched, print_lr=False)]
    # MLFlowHandler lets MLFLOW_TRACKING_URI override its tracking_uri, and the kit's arm leaves it set in this process
    # (mlflow.set_tracking_uri exports it): unset while the handlers are made and run
    saved = os.environ.pop('MLFLOW_TRACKING_URI', None)
    if root is not None:
        uri = f"sqlite:///{root/'mlflow.db'}"
        from mlflow import MlflowClient
        MlflowClient(uri).create_experiment('peer', artifact_location=str(root/'artifacts'))
        val_handlers += [MLFlowHandler(tracking_uri=uri, experiment_name='peer', run_name='peer', iteration_log=False,
                                       output_transform=lambda x: None, global_epoch_transform=lambda x: trainer.state.epoch),
                         CheckpointSaver(save_dir=str(root/'ckpt'), save_dict={'model': model}, save_key_metric=True)]
        train_handlers += [MLFlowHandler(tracking_uri=uri, experiment_name='peer', run_name='peer',
                                         output_transform=from_engine(['loss'], first=True), artifacts=[str(root/'ckpt')],
                                         close_on_complete=True)]
    evaluator = SupervisedEvaluator(device=dev, val_data_loader=vl, network=model, postprocessing=post,
                                    inferer=SlidingWindowInferer(cfg.roi_size, cfg.sw_batch_size, cfg.overlap),
                                    key_val_metric={'val_dice': MeanDice(include_background=False, output_transform=pl)},
                                    additional_metrics={'val_hd95': HausdorffDistance(include_background=False, percentile=95,
                                                                                      output_transform=pl)},
                                    val_handlers=val_handlers, amp=amp is not None)
    trainer = SupervisedTrainer(device=dev, max_epochs=cfg.epochs, train_data_loader=tl, network=model, optimizer=opt,
                                loss_function=loss_fn, inferer=SimpleInferer(), amp=amp is not None,
                                train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
                                                *train_handlers])
    stamps = [time.perf_counter()]
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: stamps.append(time.perf_counter()))  # after validation
    try: trainer.run()
    finally:
        if saved is not None: os.environ['MLFLOW_TRACKING_URI'] = saved
    return [b - a for a, b in zip(stamps, stamps[1:])], evaluator.state.best_metric


def logged(uri: str, run_id: str) -> dict:
    "What a run holds: metric points, artifact files and bytes"
    from mlflow import MlflowClient
    c = MlflowClient(uri)
    run = c.get_run(run_id)
    points = sum(len(c.get_metric_history(run_id, k)) for k in run.data.metrics)
    files, stack = [], ['']
    while stack:
        for f in c.list_artifacts(run_id, stack.pop() or None):
            (stack.append(f.path) if f.is_dir else files.append(f.file_size or 0))
    return dict(metric_keys=len(run.data.metrics), metric_points=points, params=len(run.data.params),
                tags=len(run.data.tags), files=len(files), bytes=sum(files))


def kit_loop(cfg, cases, root):
    "train() with full tracking into an embedded store; per-epoch seconds from the run's metric timestamps"
    tr = MLflowTracker(settings=load_settings(False, environ={}, store_dir=str(root), experiment_name='bench'))
    t0 = time.perf_counter()
    res = train(cfg, data_dir=Path(cases[0]['image']).parent, tracker=tr, work_dir=root/'w', progress=False)
    total = time.perf_counter() - t0
    ts = sorted(m.timestamp for m in tr.client.get_metric_history(res.run_id, 'train_loss'))
    # epoch k ends when its train_loss is stamped; the first epoch starts at the run's first step
    first = min(m.timestamp for m in tr.client.get_metric_history(res.run_id, 'train/loss'))
    steps_per_epoch = len(tr.client.get_metric_history(res.run_id, 'train/loss')) // cfg.epochs
    edges = [first] + ts
    tr.close()
    kit_loop.last = (tr.settings.tracking_uri, res.run_id)
    return [(b - a) / 1000 for a, b in zip(edges, edges[1:])], res.history, total, steps_per_epoch


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    # everything planned is set, so that every arm trains the same patches at the same spacing: train() on a data
    # folder would otherwise plan them from the fingerprint and the memory (a 64³ patch here), the bare loops not
    cfg = TrainConfig(epochs=EPOCHS, patience=EPOCHS, roi_size=(48, 48, 48), pixdim=(0.8, 0.8, 0.8), window=CT_WINDOW)
    out = dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(), epochs=EPOCHS, rounds=ROUNDS,
               device=str(pick_device()), config=dict(roi_size=cfg.roi_size, channels=cfg.channels, cases=12))
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        cases = generate_phantoms(12, t/'phantoms', seed=cfg.seed * 1000, progress=False)
        bare, kit, plain, engine, handler = [], [], [], [], []
        for r in range(ROUNDS):
            bt, bh = bare_loop(cfg, cases)
            kt, kh, total, spe = kit_loop(cfg, cases, t/f'store{r}')
            et, _ = monai_loop(cfg, cases)
            (t/f'peer{r}').mkdir()
            ht, _ = monai_loop(cfg, cases, t/f'peer{r}')
            # the first epoch of each carries one-off costs (caching, store creation): compare epochs 2..N
            bare.append(statistics.median(bt[1:])); kit.append(statistics.median(kt[1:]))
            engine.append(statistics.median(et[1:])); handler.append(statistics.median(ht[1:]))
            if r == 0:  # Dataset without a cache, once: it only shows what caching saves
                pt, _ = bare_loop(cfg, cases, cache=False); plain.append(statistics.median(pt[1:]))
                first_bare, first_kit = bh, kh
                from mlflow import MlflowClient
                puri = f"sqlite:///{t/'peer0'/'mlflow.db'}"
                prun = MlflowClient(puri).search_runs([MlflowClient(puri).get_experiment_by_name('peer').experiment_id])[0]
                out['logged'] = dict(kit=logged(*kit_loop.last), monai_mlflow_handler=logged(puri, prun.info.run_id))
            print(f"round {r + 1}: bare {bare[-1]:.3f}, kit {kit[-1]:.3f}, MONAI engine {engine[-1]:.3f}, "
                  f"+MLFlowHandler {handler[-1]:.3f} s/epoch", flush=True)
        b, k, p = statistics.median(bare), statistics.median(kit), statistics.median(plain)
        out['overhead'] = dict(bare_s_per_epoch=b, kit_s_per_epoch=k, rounds_bare=bare, rounds_kit=kit,
                               overhead_fraction=(k - b) / b, per_round_fractions=[(y - x) / x for x, y in zip(bare, kit)], target='<= 0.03')
        out['caching'] = dict(cache_s_per_epoch=b, plain_s_per_epoch=p, speedup=p / b, rounds_plain=plain)
        ratio = lambda xs, ys: dict(median=statistics.median([y / x for x, y in zip(xs, ys)]),
                                    per_round=[round(y / x, 4) for x, y in zip(xs, ys)])
        out['peer'] = dict(
            rounds_engine=engine, rounds_handler=handler,
            kit_over_bare_loop=ratio(bare, kit), handler_over_bare_engine=ratio(engine, handler),
            kit_over_handler=ratio(handler, kit), bare_loop_over_bare_engine=ratio(engine, bare),
            note="per round, epochs 2..N medians; the kit validates with Dice, clDice and HD95, MONAI's evaluator "
                 "with Dice and HD95; the handler logs the loss per step and the epoch metrics, and the best "
                 "checkpoint's folder once at the end")
        # reproducibility: the kit's train() twice with the same seed, on the CPU
        _, again, _, _ = kit_loop(cfg, cases, t/'store-repro')
        la, lb = [h['train_loss'] for h in first_kit], [h['train_loss'] for h in again]
        da, db = [h['val_dice'] for h in first_kit], [h['val_dice'] for h in again]
        out['reproducibility'] = {
            'losses_run1': la, 'losses_run2': lb, 'dice_run1': da, 'dice_run2': db,
            'max_loss_rel_diff': float(np.max(np.abs(np.subtract(la, lb)) / np.abs(la))), 'max_dice_abs_diff': float(np.max(np.abs(np.subtract(da, db)))),
            'losses_equal_rtol_1e-3': bool(np.allclose(la, lb, rtol=1e-3, atol=0)), 'dice_equal_1e-2': bool(np.allclose(da, db, atol=1e-2, rtol=0))}
    if torch.cuda.is_available():
        out['gpu'] = gpu_bench(cfg)
    pe = out['peer']
    print(f"peer: kit/bare loop {pe['kit_over_bare_loop']['median']:.3f}, MLFlowHandler/bare engine "
          f"{pe['handler_over_bare_engine']['median']:.3f}, kit/handler {pe['kit_over_handler']['median']:.3f}; "
          f"logged {out['logged']}")
    o = out['overhead']
    print(f"overhead: bare {o['bare_s_per_epoch']:.3f} s/epoch, kit {o['kit_s_per_epoch']:.3f} s/epoch -> {o['overhead_fraction']:+.1%} (target <= 3%)")
    print(f"caching: CacheDataset {out['caching']['cache_s_per_epoch']:.3f} s/epoch vs Dataset {out['caching']['plain_s_per_epoch']:.3f} s/epoch -> {out['caching']['speedup']:.2f}x")
    rp = out['reproducibility']
    print(f"per-round overhead: {', '.join(f'{x:+.1%}' for x in o['per_round_fractions'])}")
    print(f"reproducibility (kit twice): losses rtol 1e-3 {rp['losses_equal_rtol_1e-3']} (max rel diff {rp['max_loss_rel_diff']:.2g}), "
          f"Dice 1e-2 {rp['dice_equal_1e-2']} (max diff {rp['max_dice_abs_diff']:.2g})")
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(out, indent=2)); print(f"wrote {OUT}")


def gpu_bench(cfg, iters=30):
    "Training-step throughput with AMP against float32 on 2x1x(ROI) batches, and the peak memory of each"
    dev = torch.device('cuda'); torch.backends.cudnn.benchmark = True
    res = {}
    for name, dtype in (('fp32', None), ('amp', amp_dtype(dev))):
        model = build_model(cfg).to(dev); opt = torch.optim.AdamW(model.parameters(), 1e-3); loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        scaler = torch.amp.GradScaler('cuda', enabled=dtype is torch.float16)
        x = torch.rand(cfg.batch_size * cfg.samples_per_case, 1, *cfg.roi_size, device=dev)
        y = (torch.rand_like(x) > 0.95).float()
        torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize()
        for i in range(iters + 5):
            if i == 5: torch.cuda.synchronize(); t0 = time.perf_counter()
            opt.zero_grad()
            with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None): loss = loss_fn(model(x), y)
            scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        torch.cuda.synchronize()
        res[name] = dict(samples_per_s=iters * x.shape[0] / (time.perf_counter() - t0), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                         dtype=str(dtype))
    res['amp_speedup'] = res['amp']['samples_per_s'] / res['fp32']['samples_per_s']
    return res


if __name__ == '__main__': main()
