"""How well `plan_patch`'s memory estimate holds: the estimate against the peak memory of a real training step.

For the kit's default U-Net and a few patch sizes and patch counts, one fresh process per size runs one AdamW
training step on the CPU and reports its peak RSS above what it held before the step (ru_maxrss); the estimate is
`2 x patch_bytes_per_voxel x patches x voxels` (saved activations and their gradients at the peak).
On a GPU the same step's torch.cuda.max_memory_allocated would be the measure; these machines have none.

Run: .venv/bin/python bench/bench_patch.py   (writes bench/results/patch.json; about a minute)
"""
import json, os, platform, resource, subprocess, sys
from pathlib import Path

OUT = Path(__file__).parent/'results'/'patch.json'
SIZES = [(48, 8), (64, 8), (96, 4), (128, 2)]  # (patch side, patches per step)


def step(n:int, k:int) -> dict:
    import torch
    from coronary_mlops.train import TrainConfig, build_model
    model = build_model(TrainConfig()); x = torch.rand(k, 1, n, n, n)
    opt = torch.optim.AdamW(model.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(x).float().mean().backward(); opt.step()
    return dict(side=n, patches=k, measured_mb=round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))


def main():
    from coronary_mlops.train import TrainConfig, patch_bytes_per_voxel
    per_voxel = patch_bytes_per_voxel(TrainConfig())
    rows = []
    for n, k in SIZES:
        out = subprocess.run([sys.executable, __file__, 'step', str(n), str(k)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r['estimated_mb'] = round(2 * per_voxel * k * n ** 3 / 2**20)
        r['estimate_over_measured'] = round(r['estimated_mb'] / r['measured_mb'], 3)
        rows.append(r); print(r, file=sys.stderr)
    result = dict(benchmark='patch', network='TrainConfig() default U-Net', bytes_per_voxel=round(per_voxel, 1),
                  rows=rows, machine=dict(python=platform.python_version(), cpus=os.cpu_count()),
                  command='.venv/bin/python bench/bench_patch.py')
    OUT.parent.mkdir(exist_ok=True); OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'step': print(json.dumps(step(int(sys.argv[2]), int(sys.argv[3]))))
    else: main()
