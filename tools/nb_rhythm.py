"""The notebooks' rhythm, measured as issue 27 states it: per `nbs/api` notebook, its exported cells' lengths, how many
hold three or more definitions, and the share followed by an example or a test; per module, its length.

- an exported cell is a code cell whose first line is `#| export` or `#| exporti`, leaving out the cells of
  imports, `_all_` and the logger only; its length counts its other lines;
- a definition is a top-level `def` or `class` (a `@patch`ed method counts: it is written there);
- a cell is followed by an example or a test when the next code cell after it (markdown between is fine) is not
  exported: an executed example, a `fastcore.test` check, a `#| hide` test or a `show_doc`.

Run: .venv/bin/python tools/nb_rhythm.py [ROOT] [--json]   (tests/test_docs.py holds the kit to the targets)
"""
import ast, json, statistics, sys
from pathlib import Path

LIMITS = dict(module_lines=600, median_cell=12, many_defs_share=0.05, followed_share=0.60)


def _src(c) -> str: return ''.join(c['source'])
def _exported(c) -> bool: return c['cell_type'] == 'code' and _src(c).lstrip().startswith(('#| export\n', '#| exporti\n'))


def _plumbing(c) -> bool:
    "An exported cell of imports, `_all_` or a logger only: no definition to show an example of"
    try: tree = ast.parse(_src(c))
    except SyntaxError: return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.Assign) and
               all(isinstance(t, ast.Name) and t.id in ('_all_', 'log') for t in n.targets)) for n in tree.body)


def _defs(src: str) -> int:
    try: tree = ast.parse(src)
    except SyntaxError: return 0
    return sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


def notebook(path: Path) -> dict:
    cells = json.loads(path.read_text())['cells']
    codes = [c for c in cells if c['cell_type'] == 'code']
    exported = [i for i, c in enumerate(codes) if _exported(c) and not _plumbing(c)]
    lines = [len(_src(codes[i]).strip().splitlines()) - 1 for i in exported]
    many = [i for i in exported if _defs(_src(codes[i])) >= 3]
    followed = [i for i in exported if i + 1 < len(codes) and not _exported(codes[i + 1])]
    return dict(cells=len(exported), median_cell=statistics.median(lines) if lines else 0,
                longest_cell=max(lines, default=0), many_defs=len(many),
                followed_share=round(len(followed) / len(exported), 3) if exported else 1.0, lines=lines)


def measure(root: Path) -> dict:
    nbs = {p.stem: notebook(p) for p in sorted((root/'nbs'/'api').glob('*.ipynb'))}
    lines = [n for v in nbs.values() for n in v['lines']]
    modules = {p.stem: len(p.read_text().splitlines()) for p in sorted((root/'coronary_mlops').glob('*.py'))
               if not p.stem.startswith('_')}
    total = sum(v['cells'] for v in nbs.values())
    return dict(notebooks={k: {x: y for x, y in v.items() if x != 'lines'} for k, v in nbs.items()},
                modules=modules, exported_cells=total, median_cell=statistics.median(lines),
                many_defs_share=round(sum(v['many_defs'] for v in nbs.values()) / total, 3),
                followed_share=round(sum(v['followed_share'] * v['cells'] for v in nbs.values()) / total, 3))


def problems(m: dict) -> list[str]:
    out = [f"module {k}.py has {n} lines (over {LIMITS['module_lines']})" for k, n in m['modules'].items()
           if n > LIMITS['module_lines']]
    if m['median_cell'] > LIMITS['median_cell']: out.append(f"median exported cell {m['median_cell']} lines")
    if m['many_defs_share'] > LIMITS['many_defs_share']:
        out.append(f"{m['many_defs_share']:.1%} of exported cells hold 3+ definitions")
    out += [f"{k}: {v['followed_share']:.0%} of exported cells followed by an example or a test"
            for k, v in m['notebooks'].items() if v['cells'] and v['followed_share'] < LIMITS['followed_share']]
    return out


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    m = measure(Path(args[0]) if args else Path(__file__).resolve().parents[1])
    if '--json' in sys.argv: print(json.dumps(m, indent=1)); sys.exit()
    print(f"{'notebook':24} cells  median  longest  3+defs  followed")
    for k, v in m['notebooks'].items():
        print(f"{k:24} {v['cells']:5}  {v['median_cell']:6}  {v['longest_cell']:7}  {v['many_defs']:6}  "
              f"{v['followed_share']:8.0%}")
    print(f"\nall: {m['exported_cells']} exported cells, median {m['median_cell']} lines, "
          f"{m['many_defs_share']:.1%} with 3+ definitions, {m['followed_share']:.0%} followed by an example or test")
    print('modules over the limit:', {k: n for k, n in m['modules'].items() if n > LIMITS['module_lines']} or 'none')
    for p in problems(m): print('  ✗', p)
