import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def no_leaked_mlflow_env():
    """MLflow's `set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ, for child processes; a test that opened
    a tracker would otherwise send the next test's `coronary-mlops` subprocesses to its own, by then deleted, store"""
    before = {k: v for k, v in os.environ.items() if k.startswith('MLFLOW_')}
    yield
    for k in [k for k in os.environ if k.startswith('MLFLOW_') and k not in before]: del os.environ[k]
    os.environ.update(before)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    "An environment with no MLflow or kit variables, HOME and XDG_DATA_HOME in a temporary folder"
    for k in list(os.environ):
        if k.startswith(('MLFLOW_', 'CORONARY_MLOPS_')): monkeypatch.delenv(k)
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path/'xdg'))
    return tmp_path


def log_tiny_model(example_shape=(1, 1, 8, 8, 8)):
    "Log a tiny Conv3d as the active run's MLflow model (pt2 format, no pickle)"
    import mlflow, torch
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    mlflow.pytorch.log_model(net, name='model', input_example=torch.randn(*example_shape).numpy(), pip_requirements=['torch'])
    return net


def run_cli(*args, env=None, cwd=None, check=True):
    "Run the installed `coronary-mlops` command and return the CompletedProcess"
    exe = shutil.which('coronary-mlops', path=str(BIN)) or 'coronary-mlops'
    return subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, check=check, timeout=300)


# --- the real server stack: PostgreSQL + SeaweedFS S3 + mlflow server, one per test session -------------------
import secrets, uuid
from servers import MlflowServer, PostgresDB, SeaweedS3, S3_ENV


@pytest.fixture(scope='session')
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp('seaweedfs')) as s: yield s


@pytest.fixture(scope='session')
def pg_db():
    with PostgresDB() as db: yield db


def stack_server(root, pg_db, s3, port=None, **kw):
    "An mlflow server on `pg_db` with artifacts proxied to the S3 bucket"
    env = {**S3_ENV, 'MLFLOW_S3_ENDPOINT_URL': s3.endpoint}
    return MlflowServer(root, port=port, backend=pg_db.uri, artifacts=f"s3://{s3.bucket}/artifacts", env=env, **kw)


@pytest.fixture(scope='session')
def server_stack(tmp_path_factory, pg_db, s3):
    with stack_server(tmp_path_factory.mktemp('mlflow-stack'), pg_db, s3) as srv: yield srv


@pytest.fixture(params=['sqlite', 'server'])
def store(request, clean_env, tmp_path):
    "Settings for a fresh experiment on the embedded SQLite store, then on the PostgreSQL + S3 server"
    from coronary_mlops.config import load_settings
    name = f"exp-{uuid.uuid4().hex[:8]}"
    if request.param == 'sqlite': return load_settings(False, store_dir=str(tmp_path/'store'), experiment_name=name)
    srv = request.getfixturevalue('server_stack')
    return load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=srv.uri, experiment_name=name)


@pytest.fixture(scope='session')
def auth_server(tmp_path_factory):
    "`mlflow server --app-name basic-auth` with an admin and a READ-only user (passwords random per session)"
    import requests
    root = tmp_path_factory.mktemp('mlflow-auth')
    users = {'admin': 'adm-' + secrets.token_urlsafe(18), 'reader': 'rd-' + secrets.token_urlsafe(18)}
    ini = root/'auth.ini'
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root/'auth.db'}\nadmin_username = admin\nadmin_password = {users['admin']}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {'MLFLOW_AUTH_CONFIG_PATH': str(ini), 'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16)}
    with MlflowServer(root, app_name='basic-auth', env=env) as srv:
        r = requests.post(f"{srv.uri}/api/2.0/mlflow/users/create", json={'username': 'reader', 'password': users['reader']},
                          auth=('admin', users['admin']), timeout=10)
        r.raise_for_status()
        srv.users = users
        yield srv


@pytest.fixture(scope='session')
def docs_site():
    """The docs site, built once per session by tools/build_docs.py --check (MkDocs here; Quarto where it is on PATH):
    the build fails if README.md was stale (it is rewritten before any test reads it) or a link is broken"""
    p = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--check'], cwd=ROOT, capture_output=True,
                       text=True)
    if p.returncode: pytest.fail(f"tools/build_docs.py --check failed:\n{p.stderr[-3000:]}", pytrace=False)
    return ROOT/'_docs'


# --- fault injection: in-process sync, metric points, a small disk that fills, calls that must return in time -------
def sync(s, *extra, capsys=None):
    "`coronary-mlops sync` in this process (the command's own code; a fresh process costs ~7 s of imports)"
    from coronary_mlops.cli import main
    rc = main(['--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync', *extra])
    return rc, capsys.readouterr() if capsys else None


def points(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def small_disk(tmp_path):
    "A 6 MB tmpfs (root mounts it; skipped where mounting is not allowed), unmounted after the test"
    d = tmp_path/'small'; d.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    yield d
    subprocess.run(['umount', '-l', str(d)], capture_output=True)


def fill(disk, leave=0):
    "Fill `disk` until at most `leave` bytes are free (its `filler` file); `free` gives the room back"
    f = Path(disk)/'filler'
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        left = shutil.disk_usage(disk).free - leave
        while left > 0:
            n = min(left, 2**20)
            try: os.write(fd, b'\0' * n)
            except OSError: break
            left -= n
        if leave == 0:
            try:
                while True: os.write(fd, b'\0' * 4096)
            except OSError: pass
    finally: os.close(fd)
    return f


def free(disk): (Path(disk)/'filler').unlink(missing_ok=True)


def disk_store(small, tmp, name, **kw):
    "(settings, client, run id): a store on the small disk, its tracking database and artifact root in `tmp`"
    from coronary_mlops.config import load_settings
    s = load_settings(False, store_dir=str(small/'store'), tracking_uri=f'sqlite:///{tmp}/meta.db', experiment_name=name, **kw)
    c = s.client()
    eid = c.create_experiment(name, artifact_location=str(tmp/'art'/name))
    return s, c, c.create_run(eid).info.run_id


def timed(fn, limit):
    "(finished, seconds, result or exception) of fn() on a daemon thread, waiting at most `limit` seconds"
    import threading, time
    out = {}
    def run():
        try: out['v'] = fn()
        except BaseException as e: out['e'] = e
    t0 = time.monotonic(); t = threading.Thread(target=run, daemon=True); t.start(); t.join(limit)
    return not t.is_alive(), time.monotonic() - t0, out.get('e', out.get('v'))
