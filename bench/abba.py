"""Before/after rounds for the benchmarks: the kit as committed at a git ref (a worktree) against this checkout, arm by
arm in interleaved rounds (ABBA), so that the drift of a shared, noisy machine hits both sides alike."""
import contextlib, subprocess, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def kit_at(ref: str):
    "(commit, folder): a detached worktree of this repository at `ref`, removed afterwards"
    commit = subprocess.run(['git', 'rev-parse', ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as t:
        old = Path(t)/'before'
        subprocess.run(['git', 'worktree', 'add', '--detach', str(old), commit], cwd=ROOT, check=True, capture_output=True)
        try: yield commit, old
        finally: subprocess.run(['git', 'worktree', 'remove', '--force', str(old)], cwd=ROOT, capture_output=True)


def rounds(arm, old: Path, n: int, show) -> dict:
    "{'before': [...], 'after': [...]}: `arm(folder)` n times each side, in the order before, after / after, before"
    runs = {'before': [], 'after': []}
    for r in range(n):
        for name in (('before', 'after') if r % 2 == 0 else ('after', 'before')):
            runs[name].append(arm(old if name == 'before' else ROOT))
            show(r + 1, name, runs[name][-1])
    return runs
