"""The docs site without Quarto (MkDocs): a page per notebook, every public name shown and linked, links that resolve,
and pages whose outputs carry no temporary paths, store set-up lines or progress-bar residue"""
import importlib, re, sys
import pytest
from markdown.extensions.toc import slugify
from nbdev.config import nbpath2html
from conftest import ROOT

sys.path.insert(0, str(ROOT/'tools'))
import build_docs

NOISE = ('/tmp/', 'Creating initial MLflow database tables', 'Updating database tables', 'it/s]', '<ipython-input-',
         '{target=')  # Quarto's link attributes printed as text (issue 29)


@pytest.fixture(scope='module')
def site(docs_site): return docs_site


def _notebooks(): return sorted(p.relative_to(ROOT/'nbs') for p in (ROOT/'nbs').rglob('*.ipynb')
                                if not any(part.startswith(('_', '.')) for part in p.parts))


def _modules():
    for nb in _notebooks():
        m = re.search(r'#\|\s*default_exp\s+([\w.]+)', (ROOT/'nbs'/nb).read_text())
        if m: yield nb, importlib.import_module(f'coronary_mlops.{m.group(1)}')


def test_every_notebook_has_a_page_in_the_sidebar(site):
    home = (site/'index.html').read_text()
    for nb in _notebooks():
        page = nbpath2html(nb)
        assert (site/page).exists(), page
        assert f'href="{page.as_posix()}"' in home, page
    sidebar = re.findall(r'md-nav__link[^>]*>\s*<span class="md-ellipsis">\s*([^<]+?)\s*<', home)
    assert {'Tutorials', 'API'} <= set(sidebar), sidebar


def test_every_public_name_has_a_heading_and_a_link_to_it(site):
    for nb, mod in _modules():
        text = (site/nbpath2html(nb)).read_text()
        ids = set(re.findall(r'\sid="([^"]+)"', text))
        # a re-export (`_all_`: the front of `artifacts`, `tracker`, `train`, `panels`) is documented in its home module
        names = [n for n in mod.__all__ if not n.isupper() and getattr(getattr(mod, n), '__module__', mod.__name__) == mod.__name__]
        assert not [n for n in names if slugify(n, '-') not in ids], f"{nb}: no show_doc heading"
        assert not [n for n in names if f'href="#{slugify(n, "-")}"' not in text], f"{nb}: not in the page's contents"


def test_doc_links_between_pages_reach_the_symbol(site):
    reader = (site/'api'/'reader.html').read_text()
    assert 'href="artifacts.html#verify_run_artifacts"' in reader  # `verify_run_artifacts` in the reader page's prose
    assert build_docs.broken_links(site) == []  # every file and every #anchor of every page exists


def test_broken_link_and_anchor_are_reported(tmp_path):
    (tmp_path/'a.html').write_text('<h2 id="x">x</h2><a href="missing.html#x">x</a><a href="https://example.org">y</a>'
                                   '<a href="#x">ok</a><a href="a.html#nope">no</a>')
    assert build_docs.broken_links(tmp_path) == ['a.html -> missing.html#x', 'a.html -> a.html#nope (no such anchor)']


def test_pages_carry_no_temporary_paths_or_log_noise(site):
    found = {f"{p.relative_to(site)}: {n!r}" for p in site.rglob('*.html') for n in NOISE if n in p.read_text()}
    assert not found, sorted(found)


def test_pages_show_the_notebooks_outputs(site):
    quick = (site/'tutorials'/'quickstart.html').read_text()
    assert quick.count('<img') >= 6  # phantom, curves, three panel screenshots, prediction
    for text in ('best val Dice', 'RegisterModelPanel', 'RunComparison', 'version 1 @champion', 'Dice on the held-out'):
        assert text in quick, text
    assert '<img' in (site/'api'/'train.html').read_text()  # the "thin branch is missed" figure and the curves


def test_quarto_link_helpers(tmp_path):
    page = build_docs.Path('api/train.html')
    site = 'https://h.io/p'
    assert build_docs._local('https://h.io/p/api/tracker.html#MLflowTracker.log_epoch', page, page.parent, site) \
        == 'tracker.html#mlflowtrackerlog_epoch'
    assert build_docs._local('../tutorials/01_quickstart.ipynb', page, page.parent, site) \
        == '../tutorials/quickstart.html'
    assert build_docs._local('https://example.org/x', page, page.parent, site) is None


def test_readme_is_generated_from_index(site):
    readme = (ROOT/'README.md').read_text()
    assert readme == build_docs.render_readme(build_docs.get_config(ROOT))
    assert 'make demo' in readme and 'make test' in readme and 'MLFLOW_TRACKING_URI' in readme and 'make docs' in readme
    assert len(readme.splitlines()) < 115  # a front page, not a manual: the API pages hold the detail


def test_public_functions_with_many_parameters_show_a_parameter_table(site):
    "More than three parameters: each has a docment, and show_doc renders them as a table (coronary_mlops.docs)"
    import dataclasses, inspect
    from fastcore.docments import docments
    missing, tables = [], []
    for nb, mod in _modules():
        many = 0
        for n in mod.__all__:
            o = getattr(mod, n)
            if not callable(o) or getattr(o, '__module__', None) != mod.__name__: continue
            f = o.__init__ if inspect.isclass(o) and not dataclasses.is_dataclass(o) else o  # a dataclass: its fields
            params = [p for p in inspect.signature(f).parameters if p not in ('self', 'cls')]
            if len(params) > 3:
                many += 1
                d = docments(f, full=False, args_kwargs=True)
                missing += [f"{mod.__name__}.{n}({p})" for p in params if not d.get(p)]
        shown = (site/nbpath2html(nb)).read_text().count('<strong>Details</strong>')
        if shown < many: tables.append(f"{nb}: {shown} tables for {many} functions")
    assert not missing, missing
    assert not tables, tables


def test_modules_stay_small_and_every_notebook_shows_what_it_defines():
    """Issue 27's rhythm, held: no module over 600 lines, and in every notebook at least 60% of the exported cells are
    followed by an example or a test, the median exported cell is at most 12 lines, and at most 5% of them hold 3+
    definitions (tools/nb_rhythm.py)"""
    sys.path.insert(0, str(ROOT/'tools'))
    import nb_rhythm
    held = nb_rhythm.problems(nb_rhythm.measure(ROOT))
    assert not held, held
