"""Artifact-manager benchmarks, each a ratio measured side by side in one run.

1. Blocking time: how long `log_epoch` holds the training loop for a typical epoch (10 metrics, 3 PNGs, a 20 MB
   checkpoint, a JSON config) against the same epoch logged with plain synchronous mlflow calls (target >= 20x),
   and against a bare `copy_` of the same state dict into buffers allocated once, interleaved epoch by epoch
   (the floor: target <= 1.5x).
2. Upload throughput: the background upload of 4 x 50 MB into a local SQLite store with a file artifact root,
   against shutil.copyfile of the same bytes (target >= 0.8x), and against reading and sha256-hashing them (on one
   thread, and one file per core), the floor of any upload that records the sha256 of what it stored (the store is
   hard-linked, so the hash is the work). Interleaved rounds: copy, hashes and the kit in each.
3. Dedup: bytes stored for 10 epochs that re-log an identical 50 MB file. Target <= 1.05x of 50 MB.

Run: .venv/bin/python bench/bench_artifacts.py   (writes bench/results/artifacts.json)
"""
import hashlib, json, os, platform, shutil, statistics, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
import mlflow, numpy as np, torch

from coronary_mlops.config import load_settings, get_or_create_experiment
from coronary_mlops.artifacts import MLflowArtifactManager

OUT = Path(__file__).parent/'results'/'artifacts.json'
MB = 2**20


def store(root, **kw):
    s = load_settings(settings_file=False, environ={}, store_dir=root, **kw)
    c = s.client()
    return s, c, c.create_run(get_or_create_experiment(s, c)).info.run_id


def pngs(d):
    out = []
    for i in range(3):
        fig, ax = plt.subplots(figsize=(6, 4)); ax.imshow(np.random.rand(128, 128)); ax.plot(np.random.rand(50))
        p = d/f'plot{i}.png'; fig.savefig(p, dpi=100); plt.close(fig); out.append(p)
    return out


def bench_blocking(tmp, epochs=40):
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1280) for _ in range(4)])  # ~5.2M params = ~21 MB
    figs, cfg = pngs(tmp), {'lr': 1e-3, 'roi': [96, 96, 96], 'channels': [16, 32, 64, 128]}
    metrics = lambda e: {f'm{i}': 1.0 / (e + i + 1) for i in range(10)}
    s, c, rid = store(tmp/'kit', checkpoint_policy='all')
    kit, bare = [], []
    bufs = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    with MLflowArtifactManager(s, c) as m:
        for e in range(epochs + 1):  # epoch 0 warms up both sides and is not counted
            t0 = time.perf_counter()
            m.log_epoch(e, model, metrics(e), run_id=rid, artifacts={'training_curves': figs[0], 'sample_images': figs[1],
                                                                    'comparison': figs[2], 'config': cfg})
            if e: kit.append(time.perf_counter() - t0)
            m.flush()  # not timed: the next epoch's training would overlap it
            t0 = time.perf_counter()
            with torch.no_grad():
                for k, v in model.state_dict().items(): bufs[k].copy_(v)
            if e: bare.append(time.perf_counter() - t0)
    s2, c2, rid2 = store(tmp/'sync')
    mlflow.set_tracking_uri(s2.tracking_uri)
    sync = []
    with mlflow.start_run(run_id=rid2):
        for e in range(epochs + 1):
            t0 = time.perf_counter()
            mlflow.log_metrics(metrics(e), step=e)
            ck = tmp/'model.pt'; torch.save(model.state_dict(), ck)
            mlflow.log_artifact(str(ck), f'checkpoints/epoch_{e:03d}')
            for kind, f in zip(('visualizations/training_curves', 'samples', 'visualizations/comparisons'), figs):
                mlflow.log_artifact(str(f), f'{kind}/epoch_{e:03d}')
            mlflow.log_dict(cfg, f'config/epoch_{e:03d}/config.json')
            if e: sync.append(time.perf_counter() - t0)
    ckpt_mb = (tmp/'model.pt').stat().st_size / MB
    k, y, b = statistics.median(kit), statistics.median(sync), statistics.median(bare)
    q = lambda xs, f: round(sorted(xs)[int(f * (len(xs) - 1))] * 1e3, 2)
    return dict(checkpoint_mb=round(ckpt_mb, 1), epochs=epochs, kit_blocking_ms=round(k * 1e3, 2),
                kit_p10_p90_ms=[q(kit, .1), q(kit, .9)], sync_mlflow_ms=round(y * 1e3, 2),
                sync_p10_p90_ms=[q(sync, .1), q(sync, .9)], ratio=round(y / k, 1), target='>= 20x (medians)',
                bare_copy_ms=round(b * 1e3, 2), bare_p10_p90_ms=[q(bare, .1), q(bare, .9)],
                kit_over_bare_copy=round(k / b, 2), kit_over_bare_copy_target='<= 1.5x (medians)')


def bench_throughput(tmp, n=4, size=50 * MB, rounds=5):
    "Interleaved rounds: copyfile, sha256 on one thread, sha256 one file per core, the kit (end to end and worker)"
    src = tmp/'src'; src.mkdir()
    files = []
    for i in range(n):
        p = src/f'vol{i}.bin'; p.write_bytes(os.urandom(size)); files.append(p)
    total = n * size
    def sha(f):
        with open(f, 'rb') as fh: return hashlib.file_digest(fh, 'sha256').hexdigest()
    copy_s, sha_s, shan_s, worker_s, e2e_s, block_s = [], [], [], [], [], []
    for rep in range(rounds):
        d = tmp/f'copy{rep}'; d.mkdir(); t0 = time.perf_counter()
        for f in files: shutil.copyfile(f, d/f.name)
        copy_s.append(time.perf_counter() - t0); shutil.rmtree(d)
        # the floor of an upload that keeps the manifest's sha256 of the bytes stored: reading and hashing them
        t0 = time.perf_counter(); [sha(f) for f in files]; sha_s.append(time.perf_counter() - t0)
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:  # hashlib releases the GIL: one file per core
            t0 = time.perf_counter(); list(ex.map(sha, files)); shan_s.append(time.perf_counter() - t0)
        s, c, rid = store(tmp/f'kit{rep}', compress_threshold_mb=0)
        with MLflowArtifactManager(s, c) as m:
            t0 = time.perf_counter(); m.log_epoch(0, artifacts={'predictions': files}, run_id=rid)
            block_s.append(time.perf_counter() - t0); m.flush()
            e2e_s.append(time.perf_counter() - t0)
        worker_s.append(c.get_run(rid).data.metrics['artifacts/seconds'])
        shutil.rmtree(tmp/f'kit{rep}')
    cp, wk, ee, sh, shn, bl = (statistics.median(x) for x in (copy_s, worker_s, e2e_s, sha_s, shan_s, block_s))
    mbs = lambda sec: round(total / MB / sec)
    return dict(bytes=total, rounds=rounds, copyfile_mb_s=mbs(cp), sha256_mb_s=mbs(sh), sha256_per_core_mb_s=mbs(shn),
                upload_mb_s=mbs(wk), end_to_end_mb_s=mbs(ee), caller_blocked_mb_s=mbs(bl),
                ratio=round(cp / wk, 2), end_to_end_ratio=round(cp / ee, 2),
                end_to_end_over_parallel_sha256=round(shn / ee, 2),
                # copying and hashing every byte once, spread perfectly over the cores: no end to end can be faster
                end_to_end_floor_s=round((cp + sh) / (os.cpu_count() or 1), 4),
                end_to_end_floor_ratio=round(cp / ((cp + sh) / (os.cpu_count() or 1)), 2),
                per_round=dict(copy_s=[round(x, 4) for x in copy_s], worker_s=[round(x, 4) for x in worker_s],
                               end_to_end_s=[round(x, 4) for x in e2e_s], sha256_per_core_s=[round(x, 4) for x in shan_s]),
                note="upload = the background worker after the caller returns (dedup check, manifest, place in store, "
                     "metrics, and waiting for the hashes the caller's staging started); end to end = from the "
                     "log_epoch call until flush returns, including the staging copy the caller waits for; files of "
                     ">= 4 MiB start hashing while the rest of the epoch is staged", target='>= 0.8x')


def bench_dedup(tmp, epochs=10, size=50 * MB):
    f = tmp/'same.bin'; f.write_bytes(os.urandom(size))
    s, c, rid = store(tmp/'dedup')
    with MLflowArtifactManager(s, c) as m:
        for e in range(epochs): m.log_epoch(e, artifacts={'predictions': f}, run_id=rid)
    root = Path(c.get_run(rid).info.artifact_uri.removeprefix('file://'))
    seen, stored = set(), 0
    for p in root.rglob('*'):
        st = p.stat()
        if p.is_file() and (st.st_dev, st.st_ino) not in seen: seen.add((st.st_dev, st.st_ino)); stored += st.st_size
    return dict(epochs=epochs, file_mb=size / MB, stored_mb=round(stored / MB, 3), ratio=round(stored / size, 4), target='<= 1.05x')


if __name__ == '__main__':
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        res = {}
        for name, fn in [('blocking', bench_blocking), ('throughput', bench_throughput), ('dedup', bench_dedup)]:
            (t/name).mkdir(); res[name] = fn(t/name); print(name, json.dumps(res[name]))
    res['machine'] = dict(python=sys.version.split()[0], torch=torch.__version__, mlflow=mlflow.__version__,
                          cpus=os.cpu_count(), platform=platform.platform())
    OUT.parent.mkdir(parents=True, exist_ok=True); OUT.write_text(json.dumps(res, indent=2) + '\n')
    print(f"wrote {OUT}")
