"""Build the docs site from the notebooks, with Quarto when it is on PATH and without it otherwise.

With quarto: `nbdev-docs` (the full Quarto site) and `nbdev-readme`.
Without quarto (these machines): nbdev processes the notebooks into `_proc/` (directives applied, `show_doc`
rendered, doc links added), then nbconvert turns each processed notebook into a static HTML page in `_docs/`,
named as Quarto would name it, with a navigation bar, relative links between pages, and an index page.
README.md is rendered from nbs/index.ipynb either way. `--check` fails if README.md is out of date or any
internal link of the site does not resolve.
"""
import argparse, html, os, re, shutil, subprocess, sys
from pathlib import Path
from urllib.parse import urlsplit

import nbformat, yaml
from nbconvert import HTMLExporter, MarkdownExporter
from traitlets.config import Config
from nbdev.config import get_config, nbpath2html

_HREF = re.compile(r'(href|src)="([^"]*)"')
IMAGES = ('.png', '.jpg', '.jpeg', '.gif', '.svg')


def _front_matter(nb):
    "Title and description from the raw YAML cell nbdev puts first, removed from `nb`"
    meta = {}
    for c in list(nb.cells):
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            meta = yaml.safe_load(c.source.strip().strip('-')) or {}
            nb.cells.remove(c)
            break
    return meta


def _strip_directives(nb):
    "Apply `#| echo: false` as nbconvert's remove_input tag, and drop the remaining `#|` lines"
    for c in nb.cells:
        c.metadata.pop('execution', None)  # nbdev's timing floats fail nbformat's schema
        if c.cell_type != 'code': continue
        lines = c.source.splitlines()
        if any(re.match(r'#\|\s*echo:\s*false', l) for l in lines): c.metadata.setdefault('tags', []).append('remove_input')
        c.source = '\n'.join(l for l in lines if not l.startswith('#|'))
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'code' and not c.source.strip() and not c.get('outputs'))]


def _rel(target: Path, page: Path) -> str:
    return os.path.relpath(target, page.parent).replace(os.sep, '/')


def _fix_links(text: str, page: Path, src_dir: Path, nb_pages: dict, site: str) -> str:
    "Point links at notebooks and at the hosted site to the matching local page, relative to `page`"
    def sub(m):
        attr, url = m.groups()
        if site and url.startswith(site): url = '/' + url[len(site):].lstrip('/')
        elif urlsplit(url).scheme or url.startswith(('#', 'mailto:', 'data:')): return m.group(0)
        path, _, anchor = url.partition('#')
        if path.startswith('/'): target = Path(path.lstrip('/'))
        else: target = Path(os.path.normpath(src_dir/path)) if path else None
        if target is not None and target.suffix == '.ipynb': target = nb_pages.get(target.as_posix(), nbpath2html(target))
        if target is None: return m.group(0)
        return f'{attr}="{_rel(target, page)}{"#" + anchor if anchor else ""}"'
    return _HREF.sub(sub, text)


def _nav(page: Path, pages: list) -> str:
    items = ''.join(f'<li><a href="{_rel(p, page)}">{html.escape(t)}</a></li>' for p, t in pages)
    return ('<nav style="padding:.6rem 1rem;border-bottom:1px solid #ddd;font-family:sans-serif">'
            f'<ul style="list-style:none;display:flex;gap:1.2rem;margin:0;padding:0">{items}</ul></nav>')


def build_static(cfg, out: Path) -> list:
    "Render every processed notebook in `_proc` to `out`; return the pages as (path, title)"
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.doclinks import _build_modidx
    from nbdev.serve import proc_nbs
    refresh_quarto_yml(); _build_modidx()
    proc = proc_nbs(cfg.nbs_path, n_workers=0)
    nbs = sorted(proc.rglob('*.ipynb'), key=lambda p: (p.name != 'index.ipynb', str(p)))
    site = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/')
    rel = {nb.relative_to(proc).as_posix(): nbpath2html(nb.relative_to(proc)) for nb in nbs}
    loaded = []
    for nb_path in nbs:
        nb = nbformat.read(nb_path, as_version=4)
        meta = _front_matter(nb); _strip_directives(nb)
        loaded.append((nb_path, nb, meta))
    pages = [(rel[p.relative_to(proc).as_posix()], m.get('title') or p.stem) for p, _, m in loaded]
    shutil.rmtree(out, ignore_errors=True)
    for img in cfg.nbs_path.rglob('*'):  # pictures the notebooks link to, at the same relative place
        rel_img = img.relative_to(cfg.nbs_path)
        if img.suffix.lower() in IMAGES and not any(p.startswith(('_', '.')) for p in rel_img.parts):
            (out/rel_img).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(img, out/rel_img)
    c = Config(); c.TagRemovePreprocessor.enabled = True; c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    exporter = HTMLExporter(config=c, template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    for (nb_path, nb, meta), (page, title) in zip(loaded, pages):
        if meta.get('description'):
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}\n\n> {meta['description']}"))
        elif title: nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# {title}"))
        body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': title}})
        body = _fix_links(body, page, nb_path.relative_to(proc).parent, rel, site)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + _nav(page, pages), body, count=1)
        (out/page).parent.mkdir(parents=True, exist_ok=True)
        (out/page).write_text(body, encoding='utf-8')
    return pages


def render_readme(cfg) -> str:
    "README.md text from the processed index notebook, with notebook links pointing into nbs/"
    nb = nbformat.read(cfg.config_path/'_proc'/cfg.readme_nb, as_version=4)
    meta = _front_matter(nb); _strip_directives(nb)
    head = f"# {meta.get('title', cfg.lib_name)}\n\n" + (f"> {meta['description']}\n\n" if meta.get('description') else '')
    body, _ = MarkdownExporter(exclude_input_prompt=True).from_notebook_node(nb)
    body = re.sub(r'\]\((?!https?:|#|/|mailto:)([^)\s]+)\)', lambda m: f"](nbs/{m.group(1)})", body)  # notebooks, images
    return (head + re.sub(r'<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! -->\s*', '', body)).rstrip() + '\n'


def broken_links(out: Path) -> list:
    "Internal links of the static site whose target file does not exist"
    bad = []
    for page in out.rglob('*.html'):
        for _, url in _HREF.findall(page.read_text(encoding='utf-8')):
            if urlsplit(url).scheme or url.startswith(('#', 'mailto:', 'data:')): continue
            target = (page.parent/url.partition('#')[0]).resolve()
            if url.partition('#')[0] and not target.exists(): bad.append(f"{page.relative_to(out)} -> {url}")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help="fail if README.md is stale or a link is broken")
    a = ap.parse_args(argv)
    cfg = get_config()
    os.chdir(cfg.config_path)
    readme = cfg.config_path/'README.md'
    old = readme.read_text() if readme.exists() else ''
    if shutil.which('quarto'):
        subprocess.check_call(['nbdev-docs']); subprocess.check_call(['nbdev-readme'])
        print(f"Built the Quarto site into {cfg.doc_path}")
    else:
        pages = build_static(cfg, cfg.doc_path)
        readme.write_text(render_readme(cfg))
        print(f"Built {len(pages)} static pages into {cfg.doc_path}/ (index.html) with nbconvert. "
              "The full Quarto site (search, sidebar) needs quarto on PATH; then `make docs` runs nbdev-docs.")
        bad = broken_links(cfg.doc_path)
        if bad: print("Broken internal links:\n  " + '\n  '.join(bad), file=sys.stderr); return 1
    if a.check and readme.read_text() != old:
        print("README.md was out of date with nbs/index.ipynb; it has been regenerated: commit it.", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__': sys.exit(main())
