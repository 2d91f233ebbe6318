"""The data check at ImageCAS size: seconds and peak memory per case, first time and from the kept findings.

Writes N ImageCAS-sized CTA cases (512 x 512 x 200-260, int16 stored with a rescale slope/intercept, as scanners
write them; `bench_data.ct_volume`'s body, lungs, heart and tubes) and checks them with `check.check_cases`:
- `cold`: every case read and checked (headers, every voxel of image and label), on 1 thread and on the default
  threads (the cores, at most 4), each in a fresh process, interleaved in rounds;
- `kept`: the same folder again, from `checks.json` (what `train` does after `plan`, or a second run);
- `nan`: one case with a NaN block in the body and a NaN slab at its border (the connected-region test runs).
Per arm: wall seconds per case, process CPU seconds per case, and peak RSS (ru_maxrss) of the process.
The extrapolation to 1,000 cases is cases x seconds per case.

Run: .venv/bin/python bench/bench_check.py [--cases 4] [--rounds 2]   (writes bench/results/check.json)
"""
import argparse, json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
OUT = Path(__file__).parent/'results'/'check.json'


def generate(n:int, folder:Path) -> list[dict]:
    import nibabel as nib
    from bench_data import ct_volume
    folder.mkdir(parents=True, exist_ok=True)
    rng, cases = np.random.default_rng(0), []
    for i in range(n):
        img, lab, sp = ct_volume(i, rng)
        raw = nib.Nifti1Image(((img.astype(np.float32) + 1024) / 0.5).round().astype(np.int16), np.diag([*sp, 1.0]))
        raw.header.set_slope_inter(0.5, -1024)
        p = dict(image=str(folder/f"{i}.img.nii.gz"), label=str(folder/f"{i}.label.nii.gz"))
        nib.save(raw, p['image']); nib.save(nib.Nifti1Image(lab, np.diag([*sp, 1.0])), p['label'])
        cases.append(p)
    return cases


def arm(folder:str, workers:int, cache:str) -> dict:
    "One check of the folder in this process: wall and CPU seconds, peak RSS, what was found"
    from coronary_mlops.check import check_cases
    from coronary_mlops.data import discover
    cases = discover(folder)
    t0, c0 = time.perf_counter(), time.process_time()
    r = check_cases(cases, cache_dir=cache or None, progress=False, workers=workers)
    return dict(cases=len(cases), wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                findings=sorted({(f.level, f.what) for f in r.findings}))


def run_arm(folder, workers, cache) -> dict:
    out = subprocess.run([sys.executable, __file__, '--arm', folder, str(workers), cache], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--cases', type=int, default=4); ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--arm', nargs=3)
    a = ap.parse_args()
    if a.arm: print(json.dumps(arm(a.arm[0], int(a.arm[1]), a.arm[2]))); return
    tmp = Path(tempfile.mkdtemp(prefix='bench-check-'))
    t0 = time.perf_counter(); generate(a.cases, tmp/'data'); gen_s = time.perf_counter() - t0
    cores = min(4, os.cpu_count() or 1)
    rounds = []
    for r in range(a.rounds):  # interleaved: 1 thread, then the default, then the other way round
        order = (1, cores) if r % 2 == 0 else (cores, 1)
        rounds.append({f"cold_{w}_threads": run_arm(str(tmp/'data'), w, '') for w in order})
    run_arm(str(tmp/'data'), cores, str(tmp/'cache'))  # fills checks.json
    kept = run_arm(str(tmp/'data'), cores, str(tmp/'cache'))
    import nibabel as nib
    i = nib.load(tmp/'data'/'0.img.nii.gz'); hu = i.get_fdata(dtype=np.float32)
    hu[250:260, 260:270, 100:110] = np.nan; hu[:, :, :3] = np.nan
    (tmp/'nan').mkdir(); nib.save(nib.Nifti1Image(hu, i.affine), tmp/'nan'/'0.img.nii.gz')
    os.link(tmp/'data'/'0.label.nii.gz', tmp/'nan'/'0.label.nii.gz')
    nan = run_arm(str(tmp/'nan'), 1, '')
    per = lambda k, f: [round(x[k][f] / x[k]['cases'], 3) for x in rounds]
    res = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", cases=a.cases, shape='512 x 512 x 200-260',
               generate_s=round(gen_s, 1), rounds=rounds,
               cold_s_per_case={f"{w}_threads": per(f"cold_{w}_threads", 'wall_s') for w in (1, cores)},
               cold_cpu_s_per_case={f"{w}_threads": per(f"cold_{w}_threads", 'cpu_s') for w in (1, cores)},
               peak_rss_gb={f"{w}_threads": max(x[f"cold_{w}_threads"]['peak_rss_gb'] for x in rounds)
                            for w in (1, cores)},
               kept_s_per_case=round(kept['wall_s'] / kept['cases'], 4), nan_case=nan)
    best = min(min(v) for v in res['cold_s_per_case'].values())
    res['extrapolated_1000_cases_min'] = dict(cold=round(1000 * best / 60, 1),
                                             kept=round(1000 * res['kept_s_per_case'] / 60, 2))
    OUT.write_text(json.dumps(res, indent=1) + '\n')
    print(json.dumps({k: v for k, v in res.items() if k != 'rounds'}, indent=1))


if __name__ == '__main__': main()
