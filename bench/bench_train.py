"""Training-loop benchmarks, each measured side by side in one run on the same phantoms, model, seed and epochs.

1. Loop overhead: the kit's `train()` with tracking and artifacts on (per-step metrics, per-epoch curves, overlay,
   JSON, summary and best checkpoint) against a bare MONAI loop doing the same training and validation with nothing
   logged. Reported as extra seconds per epoch over the bare epoch time. Target: <= 3%.
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
from coronary_mlops.data import datasets, generate_phantoms
from coronary_mlops.train import TrainConfig, build_model, evaluate, train, pick_device, amp_dtype

OUT = Path(__file__).parent/'results'/'train.json'
EPOCHS, ROUNDS = 8, 5


def bare_loop(cfg, cases, cache=True):
    "The same training and validation as train(), with nothing logged; returns per-epoch seconds and the history"
    set_determinism(cfg.seed); cfg = cfg.planned()  # the phantoms' spacing and window, as train() plans them
    ds = datasets(cases, cfg.roi_size, cfg.pixdim, cfg.seed, cache, cfg.fractions, cfg.samples_per_case, 0)
    dev = pick_device(); amp = amp_dtype(dev, cfg.amp)
    tl = DataLoader(ds['train'], batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    vl = DataLoader(ds['val'], batch_size=1)
    model = build_model(cfg).to(dev); loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    times, hist = [], []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter(); model.train(); losses = []
        for b in tl:
            x, y = b['image'].to(dev), b['label'].to(dev)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None): loss = loss_fn(model(x), y)
            loss.backward(); opt.step(); losses.append(loss.item())
        sched.step()
        val, _ = evaluate(model, vl, cfg, dev, amp)
        times.append(time.perf_counter() - t0); hist.append(dict(train_loss=float(np.mean(losses)), **val))
    return times, hist


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
    return [(b - a) / 1000 for a, b in zip(edges, edges[1:])], res.history, total, steps_per_epoch


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = TrainConfig(epochs=EPOCHS, patience=EPOCHS)
    out = dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(), epochs=EPOCHS, rounds=ROUNDS,
               device=str(pick_device()), config=dict(roi_size=cfg.roi_size, channels=cfg.channels, cases=12))
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        cases = generate_phantoms(12, t/'phantoms', seed=cfg.seed * 1000, progress=False)
        bare, kit, plain = [], [], []
        for r in range(ROUNDS):
            bt, bh = bare_loop(cfg, cases)
            kt, kh, total, spe = kit_loop(cfg, cases, t/f'store{r}')
            pt, _ = bare_loop(cfg, cases, cache=False)
            # the first epoch of each carries one-off costs (caching, store creation): compare epochs 2..N
            bare.append(statistics.median(bt[1:])); kit.append(statistics.median(kt[1:])); plain.append(statistics.median(pt[1:]))
            print(f"round {r + 1}: bare {bare[-1]:.3f} s/epoch, kit {kit[-1]:.3f} s/epoch, plain Dataset {plain[-1]:.3f} s/epoch", flush=True)
            if r == 0: first_bare, first_kit = bh, kh
        b, k, p = statistics.median(bare), statistics.median(kit), statistics.median(plain)
        out['overhead'] = dict(bare_s_per_epoch=b, kit_s_per_epoch=k, rounds_bare=bare, rounds_kit=kit,
                               overhead_fraction=(k - b) / b, per_round_fractions=[(y - x) / x for x, y in zip(bare, kit)], target='<= 0.03')
        out['caching'] = dict(cache_s_per_epoch=b, plain_s_per_epoch=p, speedup=p / b, rounds_plain=plain)
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
