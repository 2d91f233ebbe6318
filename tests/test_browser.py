"""A real browser: JupyterLab on loopback runs the quickstart tutorial in headless Chromium (Debian's, driven by
Playwright's Python package), the panels render, a click on Register reaches the registry; the docs home page renders.
Screenshots go to tests/_artifacts/."""
import os, re, shutil, socket, subprocess, time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from conftest import ROOT, BIN

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')  # the last on GitHub's runners
ARTIFACTS = ROOT/'tests'/'_artifacts'
if not CHROMIUM:
    # make test installs Debian's chromium where it can (root with apt); in CI a missing browser is a failure, not a skip
    if os.environ.get('CI'): pytest.fail("Debian's chromium is not installed (apt-get install chromium)", pytrace=False)
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip('playwright.sync_api')
pytestmark = pytest.mark.slow

# the probe's flags: no sandbox as root, and no background connections (this machine's network is closed)
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def lab(tmp_path):
    "JupyterLab on loopback, no token, serving a temporary folder that holds a copy of the tutorial"
    root = tmp_path/'lab'; root.mkdir()
    shutil.copy(ROOT/'nbs'/'tutorials'/'01_quickstart.ipynb', root)
    store, port = tmp_path/'store', free_port()
    settings = tmp_path/'lab-settings'  # every cell stays in the page (no windowing), and no news prompt
    for ext, body in (('notebook-extension/tracker', '{"windowingMode": "none"}'),
                      ('apputils-extension/notification', '{"fetchNews": "false"}')):
        f = settings/'@jupyterlab'/f"{ext}.jupyterlab-settings"; f.parent.mkdir(parents=True, exist_ok=True); f.write_text(body)
    env = {**os.environ, 'CORONARY_MLOPS_STORE_DIR': str(store), 'HOME': str(tmp_path/'home'),
           'JUPYTER_CONFIG_DIR': str(tmp_path/'jcfg'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'jrt'),
           'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'ws'), 'JUPYTERLAB_SETTINGS_DIR': str(settings), 'PATH': f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path/'lab.log', 'w')
    proc = subprocess.Popen([str(BIN/'jupyter'), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
                             f'--ServerApp.root_dir={root}', "--IdentityProvider.token=", "--ServerApp.password=",
                             '--ServerApp.disable_check_xsrf=True', '--allow-root', '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate'],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                if requests.get(f"{url}/api/status", timeout=1).ok: break
            except requests.RequestException: pass
            assert proc.poll() is None and time.time() - t0 < 90, (tmp_path/'lab.log').read_text()[-3000:]
            time.sleep(0.3)
        yield url, store
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def wait_kernel_idle(url: str, timeout: float = 120):
    "Until the notebook's kernel has started and is idle (JupyterLab's own indicator can say idle before that)"
    t0 = time.time()
    while time.time() - t0 < timeout:
        sessions = requests.get(f"{url}/api/sessions", timeout=5).json()
        if sessions and all(s['kernel']['execution_state'] == 'idle' for s in sessions): return
        time.sleep(0.5)
    raise TimeoutError(f"no idle kernel after {timeout} s: {sessions}")


def run_all(page, tries: int = 3):
    "Run > Run All Cells, again if no cell started (a click that lands while the kernel connects is lost)"
    started = page.locator('.jp-InputArea-prompt', has_text=re.compile(r'\[(\*|\d+)\]'))
    for _ in range(tries):
        page.get_by_role('menuitem', name='Run', exact=True).click()
        page.get_by_text('Run All Cells', exact=True).click()
        try: started.first.wait_for(timeout=20_000); return
        except playwright.TimeoutError: page.keyboard.press('Escape')
    raise AssertionError("Run All Cells started no cell")


def running_cell(page) -> str:
    "The first line of the cell JupyterLab shows as running ([*]), or ''"
    cell = page.locator('.jp-CodeCell', has=page.locator('.jp-InputArea-prompt', has_text='[*]'))
    return cell.first.locator('.jp-InputArea-editor').inner_text().strip().splitlines()[0] if cell.count() else ''


def wait_for_output(page, url: str, text: str, ceiling: float = 1500):
    "Until an output shows `text`: while the kernel works, however long (up to `ceiling` s); else fail saying where"
    t0, out = time.time(), page.locator('.jp-OutputArea-output', has_text=text)
    while True:
        if out.count(): return
        err = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]', has_text='Traceback (most recent call last)')
        if err.count(): raise AssertionError(f"a cell failed: {err.first.inner_text()[-1500:]}")
        states = [s['kernel']['execution_state'] for s in requests.get(f"{url}/api/sessions", timeout=5).json()]
        cell = running_cell(page)
        if states == ['idle'] and not cell:  # the kernel rests and no cell waits, yet the text never came
            time.sleep(3)
            if out.count(): return
            raise AssertionError(f"the kernel is idle and no output shows {text!r}")
        if time.time() - t0 > ceiling:
            raise AssertionError(f"after {ceiling:.0f} s the kernel is {states}, still running the cell {cell!r}")
        time.sleep(2)


def open_and_run_all(browser, url: str, name: str):
    "A new page with notebook `name` open in JupyterLab, its kernel idle, and Run All Cells started"
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    page.goto(f"{url}/lab/tree/{name}", timeout=90_000)
    page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=90_000)
    wait_kernel_idle(url)
    run_all(page)
    return page


def versions(store: Path, name='coronary-quickstart') -> int:
    uri = f"sqlite:///{store/'mlflow.db'}"
    return len(MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'"))


def test_tutorial_panels_render_and_register_in_jupyterlab(browser, lab):
    url, store = lab
    page = open_and_run_all(browser, url, '01_quickstart.ipynb')
    try:
        # the last cell prints the held-out Dice once everything above it ran: training, panels, registration;
        # waited for on the kernel's state and the cells' progress, not on a fixed time (a busy machine is slower)
        wait_for_output(page, url, 'Dice on the held-out phantom:')
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=60_000)

        panel = page.locator('.coronary-browser')
        panel.scroll_into_view_if_needed()
        epoch = panel.locator('.coronary-epoch select')
        assert epoch.is_visible() and epoch.locator('option').count() == 12
        assert panel.locator('.coronary-preview img').first.is_visible()  # the epoch's first image, previewed
        epoch.select_option(label='3')
        panel.locator('.widget-html', has_text='epoch 3').wait_for(timeout=30_000)  # the kernel answered the change
        files = panel.locator('.coronary-files select')
        # the file list is a widget of its own: its update may arrive after the metrics'
        page.wait_for_function("el => el.value.includes('epoch_003')", arg=files.element_handle(), timeout=30_000)
        panel.screenshot(path=str(ARTIFACTS/'artifact_browser.png'))

        # the best epoch (★) saved the validation case as NIfTI: selecting its prediction opens the slice viewer
        best = next(t for t in epoch.locator('option').all_inner_texts() if t.endswith('★'))
        epoch.select_option(label=best)
        page.wait_for_function("([el, ep]) => el.value.includes(ep)", timeout=30_000,
                               arg=[files.element_handle(), f"epoch_{int(best.split()[0]):03d}"])
        files.select_option(label=next(t for t in files.locator('option').all_inner_texts() if 'val_pred' in t))
        viewer = panel.locator('.coronary-slice-viewer')
        viewer.locator('img').wait_for(timeout=30_000)
        src = viewer.locator('img').get_attribute('src')
        viewer.locator('.noUi-handle').first.focus()
        for _ in range(5): page.keyboard.press('ArrowRight')
        page.wait_for_function("([el, old]) => el.src !== old", arg=[viewer.locator('img').element_handle(), src],
                               timeout=30_000)  # the kernel redrew the slice
        viewer.screenshot(path=str(ARTIFACTS/'slice_viewer.png'))

        # the comparison's second tab: one line per run in each curve panel, as SVG elements
        comp = page.locator('.coronary-comparison')
        comp.scroll_into_view_if_needed()
        comp.locator('.lm-TabBar-tab', has_text='curves and params').click()
        comp.locator('svg g[id="run-1"]').first.wait_for(timeout=30_000)
        assert comp.locator('svg g[id="run-0"]').count() == comp.locator('svg g[id="run-1"]').count() >= 2
        assert comp.locator('svg g[id="run-2"]').count() == 0  # two runs, two lines
        comp.screenshot(path=str(ARTIFACTS/'run_curves.png'))

        before = versions(store)
        assert before == 1  # the tutorial's own registration, from code
        reg = page.locator('.coronary-register-panel')
        reg.scroll_into_view_if_needed()
        reg.locator('.coronary-register').click()
        reg.locator('.coronary-result', has_text='Registered').wait_for(timeout=60_000)
        assert versions(store) == before + 1
        assert 'version 2' in reg.locator('.coronary-result').inner_text()
        reg.screenshot(path=str(ARTIFACTS/'register_panel.png'))
        assert (ARTIFACTS/'artifact_browser.png').stat().st_size > 10_000
    except Exception:
        page.screenshot(path=str(ARTIFACTS/'failure.png'), full_page=True)
        raise
    finally:
        page.close()


LIVE = [  # a notebook that trains with a live monitor, long enough to be stopped by hand
    "from coronary_mlops.data import PhantomConfig\nfrom coronary_mlops.panels import TrainingMonitor\n"
    "from coronary_mlops.train import TrainConfig, train",
    "cfg = TrainConfig(epochs=60, patience=60, roi_size=(32, 32, 32), channels=(8, 16, 32), strides=(2, 2), samples_per_case=2)\n"
    "TrainingMonitor().start(cfg, synthetic=3, phantom=PhantomConfig(shape=(32, 32, 32)), run_name='live')",
]


def test_live_monitor_grows_and_stop_ends_the_run(browser, lab):
    import nbformat
    url, store = lab
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in LIVE])
    nb.metadata = nbformat.read(ROOT/'nbs'/'tutorials'/'01_quickstart.ipynb', as_version=4).metadata  # its kernel
    requests.put(f"{url}/api/contents/live.ipynb", json={'type': 'notebook', 'content': nb}, timeout=10).raise_for_status()
    page = open_and_run_all(browser, url, 'live.ipynb')
    try:
        mon = page.locator('.coronary-monitor')
        mon.wait_for(timeout=600_000)
        points = lambda: int(mon.locator('polyline.curve-train_loss').get_attribute('data-points') or 0)
        t0 = time.time()
        while points() < 2:  # the curves grow epoch by epoch
            assert time.time() - t0 < 600, f"the live curves stayed at {points()} points; running: {running_cell(page)!r}"
            time.sleep(1)
        grown = points()
        assert mon.locator('img').first.get_attribute('src')  # the newest overlay
        mon.screenshot(path=str(ARTIFACTS/'training_monitor.png'))
        mon.get_by_role('button', name='Stop').click()  # the cell has ended (training runs in a thread): the kernel hears it
        mon.get_by_role('button', name='stopped').wait_for(timeout=600_000)  # the monitor's end(): training is over
        client = MlflowClient(f"sqlite:///{store/'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name('coronary-segmentation').experiment_id],
                                 filter_string="attributes.run_name = 'live'")[0]
        assert run.info.status == 'FINISHED' and run.data.tags['coronary_mlops.stopped'].endswith('stopped by hand')
        assert grown <= len(client.get_metric_history(run.info.run_id, 'train_loss')) < 60  # stopped early, by hand
        mon.screenshot(path=str(ARTIFACTS/'training_monitor_stopped.png'))
    except Exception:
        page.screenshot(path=str(ARTIFACTS/'live_failure.png'), full_page=True)
        raise
    finally:
        page.close()


@pytest.fixture(scope='module')
def site_url(docs_site):
    "The built docs site, served on loopback (search runs in a web worker, which file:// pages may not start)"
    import functools, http.server, threading
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(docs_site))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", docs_site
    srv.shutdown(); srv.server_close()


def _open(browser, url: str, errors: list):
    "A page at `url` whose console errors and uncaught exceptions are appended to `errors`"
    page = browser.new_page(viewport={'width': 1280, 'height': 900})
    page.on('console', lambda m: errors.append(f"{url}: {m.text}") if m.type == 'error' else None)
    page.on('pageerror', lambda e: errors.append(f"{url}: {e}"))
    page.goto(url); page.wait_for_load_state('networkidle')
    return page


def test_docs_site_every_page_loads_without_console_errors(browser, site_url):
    url, site = site_url
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html') if p.name != '404.html')
    assert len(pages) >= 18, pages
    errors = []
    for rel in pages:
        page = _open(browser, f"{url}/{rel}", errors)
        assert page.locator('article h1').count() >= 1, rel
        page.close()
    assert not errors, errors


def test_docs_site_quickstart_shows_its_results_and_the_sidebar_has_sections(browser, site_url):
    url, _ = site_url
    ARTIFACTS.mkdir(exist_ok=True)
    errors = []
    page = _open(browser, f"{url}/tutorials/quickstart.html", errors)
    try:
        shown = page.evaluate("[...document.querySelectorAll('article img')]"
                              ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert shown >= 5, f"{shown} images rendered"  # phantom, curves, three panel screenshots, prediction
        assert page.get_by_text('Dice on the held-out phantom').count() and page.get_by_text('@champion').count()
        sections = page.locator('.md-nav--primary .md-nav__item--section > label, '
                                '.md-nav--primary .md-nav__item--section > .md-nav__link')
        assert {'Tutorials', 'API'} <= {t.strip() for t in sections.all_inner_texts()}
        page.screenshot(path=str(ARTIFACTS/'docs_quickstart.png'), full_page=True)
        page.goto(f"{url}/api/artifacts.html"); page.wait_for_load_state('networkidle')
        page.screenshot(path=str(ARTIFACTS/'docs_artifacts.png'))
        assert not errors, errors
    finally:
        page.close()


def test_docs_site_search_finds_log_epoch_artifacts(browser, site_url):
    url, _ = site_url
    errors = []
    page = _open(browser, f"{url}/index.html", errors)
    try:
        box = page.locator('input.md-search__input')  # the header's search box (a wide window shows it)
        box.click(); box.type('log_epoch_artifacts')
        hit = page.locator('.md-search-result__link[href*="api/artifacts.html"]')
        hit.first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS/'docs_search.png'))
        hit.first.click(); page.wait_for_load_state()
        assert '/api/artifacts.html' in page.url
        assert page.locator('#log_epoch_artifacts').count() == 1  # the symbol's own heading on that page
        assert not errors, errors
    finally:
        page.close()


def test_stock_mlflow_ui_shows_a_kit_run_like_a_fluent_run(browser, tmp_path):
    "Issue 16: a store written by `coronary-mlops train --register`, served by a real `mlflow server`, in Chromium"
    from conftest import run_cli
    from servers import MlflowServer
    store = tmp_path/'store'
    out = run_cli('--store-dir', str(store), 'train', '--synthetic', '4', '--epochs', '2', '--roi', '32', '--register',
                  '--onnx', cwd=tmp_path)
    uri = f"sqlite:///{store/'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name('coronary-segmentation')
    run = client.search_runs([exp.experiment_id])[0]
    mv = client.get_model_version_by_alias('coronary-segmentation', 'champion')  # not coronary-coronary-…
    assert f"runs:/{run.info.run_id}/onnx/model.onnx" in out.stdout and '/tmp/' not in out.stdout.split('ONNX')[1].split('\n')[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with MlflowServer(tmp_path/'server', backend=uri, artifacts=str(store/'artifacts')) as srv:
        page = browser.new_page(viewport={'width': 1500, 'height': 1000})
        try:
            # the link the kit prints: MLflow 3.17 opens experiments in its GenAI view unless told otherwise
            link = next(l for l in out.stdout.splitlines() if l.startswith('then browse')).split(': ', 1)[1]
            assert link.endswith(f"/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
            page.goto(srv.uri + link[link.index('/#/'):], timeout=90_000)
            page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)  # the training view's runs table
            table = page.locator('body').inner_text()
            assert 'Run Name' in table and 'phantoms/train' in table and 'Overview' not in table
            page.screenshot(path=str(ARTIFACTS/'mlflow_experiment.png'))
            page.goto(f"{srv.uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning",
                      timeout=90_000)
            page.get_by_text('Best validation Dice').first.wait_for(timeout=60_000)  # the description
            body = page.locator('body').inner_text()
            assert run.data.tags['mlflow.user'] in body  # Created by
            assert Path(run.data.tags['mlflow.source.name']).name in body  # Source
            assert 'phantoms/train' in body  # Datasets
            page.screenshot(path=str(ARTIFACTS/'mlflow_run.png'), full_page=True)
            page.goto(f"{srv.uri}/#/models/coronary-segmentation/versions/{mv.version}?workflowType=machine_learning",
                      timeout=90_000)
            page.get_by_text('dataset_digest').first.wait_for(timeout=60_000)
            body = page.locator('body').inner_text()
            assert mv.tags['dataset_digest'] in body and 'val_dice' in body and 'mlflow models serve' in body
            page.screenshot(path=str(ARTIFACTS/'mlflow_model_version.png'), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS/'mlflow_failure.png'), full_page=True)
            raise
        finally:
            page.close()
