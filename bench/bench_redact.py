"""Issue 14, blocking: what redacting an epoch's metadata costs the caller of `log_epoch`, before and after reading the
environment's secret values once per call instead of once per string. Interleaved in one run: each round logs one
epoch (10 metrics, 3 PNGs, a config, a 20 MB checkpoint) with the previous redaction patched in, and one with the
kit's, and times both `log_epoch` calls; a bare `copy_` of the same state dict is timed in the same round. The
environment is padded to 150 variables (a login shell, CI or a cluster job has 100-300), none of them secret.

Run: .venv/bin/python bench/bench_redact.py   (writes bench/results/redact.json)
"""
import json, os, statistics, sys, tempfile, time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).parent))
import bench_artifacts as B
import coronary_mlops.artifacts as A, coronary_mlops.config as C, coronary_mlops.storage as S
from coronary_mlops.artifacts import MLflowArtifactManager

OUT = Path(__file__).parent/'results'/'redact.json'


def redact_text_before(text, environ=None):  # the kit before this change: the environment scanned for every string
    if not isinstance(text, str) or not text: return text
    out = C._PAIR.sub(rf'\1{C.REDACTED}', C._QUERY.sub(rf'\1{C.REDACTED}', C._URI_PW.sub(rf'\1{C.REDACTED}\3', text)))
    for name, v in (os.environ if environ is None else environ).items():
        if C.is_secret_name(name) and v and len(v) >= 6 and v in out: out = out.replace(v, C.REDACTED)
    return out


def redact_before(obj):
    if isinstance(obj, dict):
        return {k: (C.REDACTED if C.is_secret_name(k) and v not in (None, '') else redact_before(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(redact_before(v) for v in obj)
    if isinstance(obj, str): return redact_text_before(obj)
    return obj


def use(fn):
    for mod in (A, S): mod.redact = fn


def main(rounds=60):
    for i in range(150 - len(os.environ)): os.environ.setdefault(f'BENCH_PAD_{i}', f'value-{i}-' + 'x' * 40)
    tmp = Path(tempfile.mkdtemp())
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1280) for _ in range(4)])
    figs = B.pngs(tmp)
    cfg = {'lr': 1e-3, 'roi': [96, 96, 96], 'channels': [16, 32, 64, 128], 'data': '/data/ImageCAS', 'note': 'x' * 80}
    bufs = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    s, c, rid = B.store(tmp/'kit', checkpoint_policy='all')
    t = {'before': [], 'after': [], 'bare': []}
    with MLflowArtifactManager(s, c) as m:
        for e in range(2 * rounds + 2):
            arm = ('before', 'after')[(e + e // 2) % 2]  # ABBA order: neither arm always goes first
            use(redact_before if arm == 'before' else C.redact)
            t0 = time.perf_counter()
            m.log_epoch(e, model, {f'm{i}': 1.0 / (e + i + 1) for i in range(10)}, run_id=rid,
                        metadata={'hyperparameters': cfg, 'seed': 0},
                        artifacts={'training_curves': figs[0], 'sample_images': figs[1], 'comparison': figs[2],
                                   'config': cfg})
            dt = time.perf_counter() - t0
            m.flush()
            t0 = time.perf_counter()
            with torch.no_grad():
                for k, v in model.state_dict().items(): bufs[k].copy_(v)
            if e >= 2: t[arm].append(dt); t['bare'].append(time.perf_counter() - t0)
    use(C.redact)
    med = {k: statistics.median(v) for k, v in t.items()}
    pairs = sorted(b / a for b, a in zip(t['before'], t['after']))
    q = lambda xs, f: xs[int(f * (len(xs) - 1))]
    res = dict(rounds=rounds, env_vars=len(os.environ),
               before_ms=round(med['before'] * 1e3, 2), after_ms=round(med['after'] * 1e3, 2),
               before_over_after=round(statistics.median(pairs), 3),
               before_over_after_p10_p90=[round(q(pairs, .1), 3), round(q(pairs, .9), 3)],
               bare_copy_ms=round(med['bare'] * 1e3, 2),
               after_over_bare_copy=round(med['after'] / med['bare'], 2),
               before_over_bare_copy=round(med['before'] / med['bare'], 2), target='<= 1.5x the bare copy (medians)')
    OUT.write_text(json.dumps(res, indent=2) + '\n'); print(json.dumps(res)); print(f"wrote {OUT}")


if __name__ == '__main__': main()
