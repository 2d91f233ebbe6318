"The docs build without Quarto: a page per notebook, every public name shown, links that resolve"
import importlib, re, subprocess, sys
import pytest
from nbdev.config import nbpath2html
from conftest import ROOT

sys.path.insert(0, str(ROOT/'tools'))
import build_docs


@pytest.fixture(scope='module')
def site():
    subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py')], cwd=ROOT, check=True, capture_output=True)
    return ROOT/'_docs'


def _notebooks(): return sorted(p.relative_to(ROOT/'nbs') for p in (ROOT/'nbs').rglob('*.ipynb')
                                if not any(part.startswith(('_', '.')) for part in p.parts))


def test_every_notebook_has_a_page_listed_on_the_home_page(site):
    home = (site/'index.html').read_text()
    for nb in _notebooks():
        page = nbpath2html(nb)
        assert (site/page).exists(), page
        assert f'href="{page.as_posix()}"' in home, page


def test_every_public_name_is_documented(site):
    for nb in _notebooks():
        m = re.search(r'#\|\s*default_exp\s+([\w.]+)', (ROOT/'nbs'/nb).read_text())
        if not m: continue
        mod = importlib.import_module(f'coronary_mlops.{m.group(1)}')
        text = (site/nbpath2html(nb)).read_text()
        missing = [n for n in mod.__all__ if not n.isupper() and f'id="{n.lower()}"' not in text.lower()
                   and f'<h3>{n}' not in text and f'>{n}<' not in text]
        assert not missing, f"{nb}: no show_doc for {missing}"


def test_internal_links_resolve(site):
    assert build_docs.broken_links(site) == []
    assert 'href="api/config.html"' in (site/'index.html').read_text()


def test_broken_link_is_reported(tmp_path):
    (tmp_path/'a.html').write_text('<a href="missing.html#x">x</a><a href="https://example.org">y</a>')
    assert build_docs.broken_links(tmp_path) == ['a.html -> missing.html#x']


def test_readme_is_generated_from_index(site):
    readme = (ROOT/'README.md').read_text()
    assert readme == build_docs.render_readme(build_docs.get_config(ROOT))
    assert 'make demo' in readme and 'make test' in readme and 'MLFLOW_TRACKING_URI' in readme
    assert len(readme.splitlines()) < 110  # a front page, not a manual: the API pages hold the detail
