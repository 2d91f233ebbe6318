"""Build the docs site from the notebooks: with Quarto when it is on PATH, else with MkDocs (Material + mkdocs-jupyter).

With quarto (users' and CI hosts): `nbdev-docs` (the full Quarto site) and `nbdev-readme`.
Without quarto (these machines): nbdev processes the notebooks into `_proc/` (directives applied, `show_doc`
rendered, doc links added); each processed notebook is staged under `_mkdocs/` at the path Quarto would give
its page, with its front matter as a title and its links pointing at the local pages; MkDocs builds `_docs/` from
there with `mkdocs.yml` and a sidebar in the order of the notebooks. The notebooks' committed outputs are what the
pages show (neither path executes them). README.md is rendered from nbs/index.ipynb either way.
`--check` fails if README.md is out of date or any internal link of the site does not resolve.
"""
import argparse, os, re, shutil, subprocess, sys
from pathlib import Path
from urllib.parse import urlsplit

import nbformat, yaml
from markdown.extensions.toc import slugify
from nbconvert import MarkdownExporter
from nbdev.config import get_config, nbpath2html

_HREF = re.compile(r'(href|src)="([^"]*)"')
_ID = re.compile(r'\sid="([^"]+)"')
_MDLINK = re.compile(r'(\]\()([^)\s]+)(\))')
# nbdev links every indexed name, private helpers too, but a page shows headings for public names only: such a link
# would point at no anchor, so its text stays as plain code
_PRIVATE_LINK = re.compile(r'\[(`_\w+`)\]\([^)\s]*#_[^)\s]*\)(?:\{[^{}\n]*\})?')
# nbdev's source links carry Quarto's attributes (`[source](url){target="_blank" style=...}`), which the notebook
# renderer of MkDocs prints as text: they become an HTML link with those attributes
_QUARTO_ATTRS = re.compile(r'\[((?:[^\[\]\n]|\[[^\]\n]*\])+)\]\(([^)\s]+)\)\{([^{}\n]*=[^{}\n]*)\}')  # [x] inside too
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
    "Apply `#| echo: false` as the `remove_input` tag, and drop the remaining `#|` lines"
    for c in nb.cells:
        c.metadata.pop('execution', None)  # nbdev's timing floats fail nbformat's schema
        if c.cell_type != 'code': continue
        lines = c.source.splitlines()
        if any(re.match(r'#\|\s*echo:\s*false', l) for l in lines): c.metadata.setdefault('tags', []).append('remove_input')
        c.source = '\n'.join(l for l in lines if not l.startswith('#|'))
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'code' and not c.source.strip() and not c.get('outputs'))]


def _rel(target: Path, page: Path) -> str:
    return os.path.relpath(target, page.parent).replace(os.sep, '/')


def _local(url: str, page: Path, src_dir: Path, site: str):
    "`url` (a notebook, a page of the hosted site, a relative file) as a link relative to `page`, or None to keep it"
    if site and url.startswith(site): url = '/' + url[len(site):].lstrip('/')
    elif urlsplit(url).scheme or url.startswith(('#', 'mailto:', 'data:')): return None
    path, _, anchor = url.partition('#')
    if not path: return None
    target = Path(path.lstrip('/')) if path.startswith('/') else Path(os.path.normpath(src_dir/path))
    if target.suffix == '.ipynb': target = nbpath2html(target)
    if anchor and target.suffix == '.html': anchor = slugify(anchor, '-')  # Quarto's `#cls.meth` is MkDocs' `#clsmeth`
    return _rel(target, page) + (f"#{anchor}" if anchor else '')


def _fix_links(text: str, page: Path, src_dir: Path, site: str) -> str:
    "Markdown and HTML links in `text` to notebooks and to the hosted site, pointed at the local pages"
    def sub(m):
        new = _local(m.group(2), page, src_dir, site)
        return m.group(0) if new is None else m.group(0).replace(m.group(2), new, 1)
    text = _QUARTO_ATTRS.sub(r'<a href="\2" \3>\1</a>', _PRIVATE_LINK.sub(r'\1', text))
    return _MDLINK.sub(sub, _HREF.sub(sub, text))


def stage(cfg, proc: Path, out: Path) -> list:
    "Processed notebooks from `proc` into `out` at their pages' paths, titled and linked locally; the sidebar entries"
    site = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/')
    nbs = sorted(proc.rglob('*.ipynb'), key=lambda p: (p.name != 'index.ipynb', str(p)))
    shutil.rmtree(out, ignore_errors=True)
    nav = []
    for nb_path in nbs:
        rel = nb_path.relative_to(proc)
        page = nbpath2html(rel)  # api/01_artifacts.ipynb -> api/artifacts.html, as Quarto names it
        nb = nbformat.read(nb_path, as_version=4)
        meta = _front_matter(nb); _strip_directives(nb)
        # no live widgets on a static page: without this key the panels show their markdown fallback, and the page
        # loads no widget manager from a CDN (the site works offline, as on a hospital network)
        nb.metadata.pop('widgets', None)
        title = meta.get('title') or rel.stem
        head = f"# {title}" + (f"\n\n> {meta['description']}" if meta.get('description') else '')
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(head))
        for c in nb.cells:
            if c.cell_type == 'markdown': c.source = _fix_links(c.source, page, rel.parent, site)
            for o in c.get('outputs', []):
                for mime in ('text/markdown', 'text/html'):
                    if mime in o.get('data', {}):
                        o['data'][mime] = _fix_links(''.join(o['data'][mime]), page, rel.parent, site)
        dest = out/page.with_suffix('.ipynb')
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest)
        section = '' if rel.parent == Path('.') else rel.parent.as_posix()
        nav.append((section, title, page.with_suffix('.ipynb').as_posix()))
    for img in cfg.nbs_path.rglob('*'):  # pictures the notebooks link to, at the same relative place
        rel_img = img.relative_to(cfg.nbs_path)
        if img.suffix.lower() in IMAGES and not any(p.startswith(('_', '.')) for p in rel_img.parts):
            (out/rel_img).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(img, out/rel_img)
    return nav


def mkdocs_config(root: Path, docs: Path, site_dir: Path, nav: list, dest: Path) -> Path:
    "`dest`: mkdocs.yml of the project with the staged folder, the output folder and the sidebar filled in"
    conf = yaml.safe_load((root/'mkdocs.yml').read_text())
    sections, tree = {'': 'Home', 'tutorials': 'Tutorials', 'api': 'API'}, []
    order = list(sections)  # Home, then the tutorials, then the API reference, as nbdev's sidebar
    for section, title, path in sorted(nav, key=lambda e: order.index(e[0]) if e[0] in order else len(order)):
        if section == '': tree.append({'Home' if path == 'index.ipynb' else title: path}); continue
        name = sections.get(section, section.title())
        group = next((g for g in tree if isinstance(g.get(name), list)), None)
        if group is None: group = {name: []}; tree.append(group)
        group[name].append({title: path})
    hooks = [str(root/h) for h in conf.get('hooks', [])]  # relative to the project, not to the written file
    conf.update(docs_dir=str(docs), site_dir=str(site_dir), nav=tree, hooks=hooks)
    dest.write_text(yaml.safe_dump(conf, sort_keys=False))
    return dest


def build_mkdocs(cfg) -> list:
    "`_docs/` from the processed notebooks with MkDocs; the sidebar entries"
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.doclinks import _build_modidx
    from nbdev.serve import proc_nbs
    refresh_quarto_yml(); _build_modidx()
    proc = proc_nbs(cfg.nbs_path, n_workers=0)
    staged = cfg.config_path/'_mkdocs'  # beside _proc, not in it: nbdev owns _proc and sweeps files it did not make
    nav = stage(cfg, proc, staged)
    conf = mkdocs_config(cfg.config_path, staged, cfg.config_path/cfg.doc_path, nav, proc/'mkdocs.yml')
    # NO_MKDOCS_2_WARNING: Material 9.7+ prints a banner on every build about its end of life (May 2027; the note in
    # mkdocs.yml says what then)
    subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--clean', '--quiet', '-f', str(conf)], check=True,
                   env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    return nav


def render_readme(cfg) -> str:
    "README.md text from the processed index notebook, with notebook links pointing into nbs/"
    nb = nbformat.read(cfg.config_path/'_proc'/cfg.readme_nb, as_version=4)
    meta = _front_matter(nb); _strip_directives(nb)
    head = f"# {meta.get('title', cfg.lib_name)}\n\n" + (f"> {meta['description']}\n\n" if meta.get('description') else '')
    body, _ = MarkdownExporter(exclude_input_prompt=True).from_notebook_node(nb)
    body = re.sub(r'\]\((?!https?:|#|/|mailto:)([^)\s]+)\)', lambda m: f"](nbs/{m.group(1)})", body)  # notebooks, images
    return (head + re.sub(r'<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! -->\s*', '', body)).rstrip() + '\n'


def broken_links(out: Path) -> list:
    "Internal links of the built site whose target file, or the element its `#anchor` names, does not exist"
    bad, ids = [], {}
    def has_id(f: Path, anchor: str) -> bool:
        if f not in ids: ids[f] = set(_ID.findall(f.read_text(encoding='utf-8', errors='replace')))
        return anchor in ids[f]
    for page in out.rglob('*.html'):
        if page.name == '404.html': continue  # served at any depth, so MkDocs links it absolutely under site_url
        page, text = page.resolve(), page.read_text(encoding='utf-8')
        ids.setdefault(page, set(_ID.findall(text)))  # each page is read once, for its links and its ids
        for _, url in _HREF.findall(text):
            if urlsplit(url).scheme or url.startswith(('mailto:', 'data:')): continue
            path, _, anchor = url.partition('#')
            target = (page.parent/path).resolve() if path else page
            if not target.exists(): bad.append(f"{page.relative_to(out.resolve())} -> {url}")
            elif anchor and target.suffix == '.html' and not has_id(target, anchor):
                bad.append(f"{page.relative_to(out.resolve())} -> {url} (no such anchor)")
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
        nav = build_mkdocs(cfg)
        readme.write_text(render_readme(cfg))
        print(f"Built {len(nav)} pages into {cfg.doc_path}/ with MkDocs (quarto is not on PATH; with it, "
              "`make docs` runs nbdev-docs). Browse it with: python -m http.server -d _docs")
        bad = broken_links(cfg.config_path/cfg.doc_path)
        if bad: print("Broken internal links:\n  " + '\n  '.join(bad), file=sys.stderr); return 1
    if a.check and readme.read_text() != old:
        print("README.md was out of date with nbs/index.ipynb; it has been regenerated: commit it.", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__': sys.exit(main())
