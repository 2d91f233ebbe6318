"""Data at ImageCAS size: memory and time of the kit's cache choice against a full in-memory cache and no cache.

Generates ImageCAS-sized CTA volumes (512 x 512 x 200-260, in-plane 0.35-0.45 mm, 0.5 mm slices, int16, with a
body, lungs, a heart and three tubes labelled as vessels; nothing is downloaded), then for N = 8, 24 and 48 cases
measures, each arm in a fresh process:
- `kit`: `datasets(..., cache_budget_gb=BUDGET)`, i.e. CacheDataset within the budget, PersistentDataset beyond;
- `disk`: the kit forced onto its disk cache (a budget of 1 MB), run twice (the second run reuses the cache),
  where the kit chose memory at the largest N, to compare its epochs with the in-memory cache's;
- `full_cache`: CacheDataset of every case, where the kit chose disk and it fits in the machine's memory;
- `plain`: Dataset, every transform every epoch.
The cache holds float16 images and uint8 labels (3 bytes a voxel), so at 2 GB the kit keeps all 48 in memory.
Per arm: peak RSS of the process (ru_maxrss), start-up (building the datasets and the first epoch, which fills
the disk cache), and seconds per later epoch (one pass over the training loader: random patches, no model, so the
loading itself is measured). Where the kit chose the disk cache, its arm runs twice: the second run reuses it.

Targets (issue 13): peak RSS <= budget + 1.5 GB whatever N; the kit's epoch within 1.2x of the full cache where
that fits; the second run's start-up >= 5x faster than the first.

Run: .venv/bin/python bench/bench_data.py   (writes bench/results/data.json; about 30 minutes on 2 cores)
"""
import json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent/'results'/'data.json'
SIZES, BUDGET_GB, EPOCHS, CACHED_EPOCHS = (8, 24, 48), 2.0, 2, 6  # the plain arm's epochs take minutes
PIXDIM = (0.8, 0.8, 0.8)  # the epoch and memory arms; bytes per case are reported for the planned spacing too
ROI, SAMPLES = (48, 48, 48), 4


def ct_volume(i:int, rng) -> tuple[np.ndarray, np.ndarray, tuple]:
    "An ImageCAS-sized CTA (int16 HU) and its vessel label: body, lungs, heart, blood pool and three tubes"
    nz, sp = int(rng.integers(200, 261)), (float(rng.uniform(0.35, 0.45)),) * 2 + (0.5,)
    y, x = np.ogrid[:512, :512]
    img, lab = np.empty((512, 512, nz), np.int16), np.zeros((512, 512, nz), np.uint8)
    body = ((x - 256) / 230.0) ** 2 + ((y - 256) / 180.0) ** 2 < 1
    lung = lambda cx: ((x - cx) / 80.0) ** 2 + ((y - 250) / 110.0) ** 2 < 1
    lungs = lung(160) | lung(352)
    for z in range(nz):
        t = z / nz
        heart_r = 95 * np.sqrt(max(0.0, 1 - (2 * t - 1) ** 2))
        heart = ((x - 256) ** 2 + (y - 270) ** 2) < heart_r ** 2
        s = np.where(body, -90, -1000).astype(np.int16)
        s[lungs & body] = -780; s[heart] = 60; s[((x - 256) ** 2 + (y - 270) ** 2) < (0.6 * heart_r) ** 2] = 330
        for k in range(3):  # tubes winding over the heart's surface, about 3-4 mm across
            a = 2 * np.pi * (k / 3 + 0.6 * t)
            cx, cy = 256 + (heart_r + 6) * np.cos(a), 270 + (heart_r + 6) * np.sin(a)
            tube = (x - cx) ** 2 + (y - cy) ** 2 < (1.8 / sp[0]) ** 2
            s[tube] = 420; lab[:, :, z] |= tube
        img[:, :, z] = s
    img += rng.normal(0, 20, img.shape).astype(np.int16)
    return img, lab, sp


def generate(n:int, folder:Path):
    import nibabel as nib
    from tqdm import tqdm
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in tqdm(range(n), desc='generating ImageCAS-sized volumes'):
        img, lab, sp = ct_volume(i, rng)  # drawn even when the file exists, so the sizes stay the same
        if (folder/f"{i}.label.nii.gz").exists(): continue
        aff = np.diag([*sp, 1.0])
        nib.save(nib.Nifti1Image(img, aff), str(folder/f"{i}.img.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(folder/f"{i}.label.nii.gz"))


def arm(mode:str, n:int, data:str, cache_dir:str) -> dict:
    "One arm, in this (fresh) process: build the datasets, then EPOCHS passes over the training loader"
    import torch
    from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
    from coronary_mlops.data import datasets, discover, transforms
    cases = discover(data)[:n]
    t0 = time.perf_counter()
    if mode in ('kit', 'disk'):
        ds = datasets(cases, ROI, PIXDIM, num_samples=SAMPLES, fractions=(0.8, 0.1, 0.1),
                      cache_budget_gb=BUDGET_GB if mode == 'kit' else 2**-10, cache_dir=cache_dir)
        train, plan = ds['train'], ds['cache']
    else:
        ds = datasets(cases, ROI, PIXDIM, num_samples=SAMPLES, fractions=(0.8, 0.1, 0.1), cache=False)
        items, t = [dict(c) for c in ds['split']['train']], transforms(ROI, PIXDIM, num_samples=SAMPLES)
        train = CacheDataset(items, t, cache_rate=1.0, progress=False) if mode == 'full_cache' else Dataset(items, t)
        plan = dict(mode='memory' if mode == 'full_cache' else 'none')
    loader = DataLoader(train, batch_size=2, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    times = []
    for e in range(EPOCHS if mode == 'plain' else CACHED_EPOCHS):
        te = time.perf_counter()
        for b in loader: _ = b['image'].shape
        times.append(time.perf_counter() - te)
        if e == 0: startup = time.perf_counter() - t0
    return dict(mode=mode, n=n, train_cases=len(train), chose=plan.get('mode'), need_gb=plan.get('need_gb'),
                startup_s=round(startup, 2), epoch_s=round(float(np.median(times[1:])), 3),
                epoch_range_s=[round(min(times[1:]), 3), round(max(times[1:]), 3)])


def run_arm(mode:str, n:int, data:Path, cache_dir:Path) -> dict:
    "`arm` in a child process; its peak RSS from wait4"
    p = subprocess.Popen([sys.executable, __file__, 'arm', mode, str(n), str(data), str(cache_dir)],
                         stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if status: raise RuntimeError(f"arm {mode} n={n} failed: {out[-2000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    r['peak_rss_gb'] = round(ru.ru_maxrss / 2**20, 2)
    print(r, file=sys.stderr, flush=True)
    return r


def main():
    root = Path(os.environ.get('BENCH_DATA_DIR') or tempfile.mkdtemp(prefix='bench-data-'))
    generate(max(SIZES), root/'imagecas')
    from coronary_mlops.data import available_memory, discover, preprocessed_bytes, fingerprint, plan_preprocessing
    cases = discover(root/'imagecas')
    planned = plan_preprocessing(fingerprint(cases, sample=4))['pixdim']
    per_case = {f"{PIXDIM}": preprocessed_bytes(cases, PIXDIM) / len(cases),
                f"planned {tuple(planned)}": preprocessed_bytes(cases, planned) / len(cases)}
    rows = []
    for n in SIZES:
        cache_dir = root/f'cache-{n}'
        kit = run_arm('kit', n, root/'imagecas', cache_dir)
        rows.append(kit)
        if kit['chose'] == 'disk': rows.append({**run_arm('kit', n, root/'imagecas', cache_dir), 'mode': 'kit_rerun'})
        # where the kit chose memory it *is* the full cache; where it chose disk, compare with one if it fits
        if kit['chose'] == 'disk' and kit['need_gb'] < available_memory() / 2**30 * 0.7:
            rows.append(run_arm('full_cache', n, root/'imagecas', cache_dir))
        if kit['chose'] == 'memory' and n == max(SIZES):  # its disk cache, against this in-memory one
            rows.append(run_arm('disk', n, root/'imagecas', cache_dir))
            rows.append({**run_arm('disk', n, root/'imagecas', cache_dir), 'mode': 'disk_rerun'})
        rows.append(run_arm('plain', n, root/'imagecas', cache_dir))
    def get(n, mode): return next((r for r in rows if r['n'] == n and r['mode'] == mode), None)
    checks = []
    for n in SIZES:
        k, f, re_ = get(n, 'kit'), get(n, 'full_cache'), get(n, 'kit_rerun')
        d, dre = get(n, 'disk'), get(n, 'disk_rerun')
        if d and k['chose'] == 'memory': f, k, re_ = k, d, dre  # the disk cache against the in-memory one
        kit = get(n, 'kit')
        checks.append(dict(n=n, chose=kit['chose'], kit_peak_rss_gb=kit['peak_rss_gb'],
                           rss_within_budget_plus_1_5gb=kit['peak_rss_gb'] <= BUDGET_GB + 1.5,
                           rss_over_plain_gb=round(kit['peak_rss_gb'] - get(n, 'plain')['peak_rss_gb'], 2),
                           disk_epoch_over_memory=round(k['epoch_s'] / f['epoch_s'], 2) if f else None,
                           disk_rerun_epoch_over_memory=round(re_['epoch_s'] / f['epoch_s'], 2) if f and re_ else None,
                           rerun_startup_speedup=round(k['startup_s'] / re_['startup_s'], 1) if re_ else None))
    result = dict(benchmark='data', budget_gb=BUDGET_GB, pixdim=PIXDIM, roi=ROI, samples_per_case=SAMPLES,
                  epochs=dict(plain=EPOCHS, cached=CACHED_EPOCHS), epoch_s='median of the epochs after the first',
                  bytes_per_case=per_case,
                  extrapolated_1000_cases_gb={k: round(v * 1000 / 2**30, 1) for k, v in per_case.items()},
                  rows=rows, checks=checks,
                  note="rss_over_plain_gb: the kit's peak above the plain Dataset's (torch, MONAI and one full-size "
                       "case in flight, which no cache choice removes)",
                  machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                               mem_gb=round(available_memory() / 2**30, 1)),
                  command='.venv/bin/python bench/bench_data.py')
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'arm': print(json.dumps(arm(sys.argv[2], int(sys.argv[3]), *sys.argv[4:])))
    else: main()
