"Settings precedence, file discovery, redaction and bad values, against real files and the real environment"
import os, subprocess, sys
import pytest
from coronary_mlops.config import load_settings, SettingsError, DEFAULTS, redact, get_or_create_experiment
from conftest import ROOT, run_cli

INI = "[mlflow]\nexperiment_name = from-ini\n[training]\nepochs = 5\nbatch_size = 4\nseed = 1\nlearning_rate = 0.5\n"


@pytest.fixture
def project(clean_env, monkeypatch):
    "A project folder with settings.ini, a .env and a nested notebook folder; cwd is the nested folder"
    p = clean_env/'proj'; (p/'nbs'/'api').mkdir(parents=True)
    (p/'settings.ini').write_text(INI)
    (p/'.env').write_text("CORONARY_MLOPS_BATCH_SIZE=8\nCORONARY_MLOPS_SEED=2\nCORONARY_MLOPS_LEARNING_RATE=0.25\n")
    monkeypatch.chdir(p/'nbs'/'api')
    return p


def test_defaults_without_any_layer(clean_env):
    s = load_settings(settings_file=False)
    for k in ('epochs', 'batch_size', 'seed', 'checkpoint_policy', 'roi_size'): assert getattr(s, k) == DEFAULTS[k]
    assert s.tracking_uri == f"sqlite:///{(clean_env/'xdg').resolve()}/coronary_mlops/mlflow.db"
    assert set(s.sources) == set()


def test_each_layer_overrides_the_one_below(project, monkeypatch):
    monkeypatch.setenv('CORONARY_MLOPS_SEED', '3')
    monkeypatch.setenv('CORONARY_MLOPS_LEARNING_RATE', '0.125')
    s = load_settings(learning_rate=0.0625)
    assert (s.experiment_name, s.sources['experiment_name']) == ('from-ini', 'settings.ini')
    assert (s.epochs, s.sources['epochs']) == (5, 'settings.ini')
    assert (s.batch_size, s.sources['batch_size']) == (8, '.env')
    assert (s.seed, s.sources['seed']) == (3, 'environment')
    assert (s.learning_rate, s.sources['learning_rate']) == (0.0625, 'argument')
    assert s.val_interval == DEFAULTS['val_interval'] and 'val_interval' not in s.sources


def test_mlflow_env_names(project, monkeypatch):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'http://127.0.0.1:5999')
    monkeypatch.setenv('MLFLOW_S3_ENDPOINT_URL', 'http://127.0.0.1:8333')
    monkeypatch.setenv('MLFLOW_EXPERIMENT_NAME', 'env-exp')
    s = load_settings()
    assert (s.tracking_uri, s.registry_uri, s.s3_endpoint_url) == ('http://127.0.0.1:5999',)*2 + ('http://127.0.0.1:8333',)
    assert s.experiment_name == 'env-exp' and not s.is_embedded and s.artifact_location is None


def test_empty_values_fall_through(project, monkeypatch):
    monkeypatch.setenv('CORONARY_MLOPS_EPOCHS', '')
    assert load_settings(epochs=None).epochs == 5


def test_env_file_named_by_variable(project, monkeypatch, tmp_path):
    other = tmp_path/'other.env'; other.write_text("CORONARY_MLOPS_EPOCHS=11\n")
    monkeypatch.setenv('CORONARY_MLOPS_ENV_FILE', str(other))
    s = load_settings()
    assert (s.epochs, s.sources['epochs'], s.batch_size) == (11, '.env', 4)


def test_store_location_does_not_depend_on_cwd(project):
    "A script at the root and a notebook two folders down resolve the same store"
    code = "from coronary_mlops.config import load_settings; print(load_settings().tracking_uri)"
    env = {**os.environ}
    uris = {subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True,
                           check=True).stdout.strip() for cwd in (project, project/'nbs', project/'nbs'/'api')}
    assert len(uris) == 1 and uris.pop().endswith('/xdg/coronary_mlops/mlflow.db')


def test_relative_store_dir_is_relative_to_settings_ini(project):
    (project/'settings.ini').write_text(INI.replace('[mlflow]\n', '[mlflow]\nstore_dir = runs\n'))
    s = load_settings()
    assert s.store_dir == str((project/'runs').resolve())
    assert s.artifact_location == (project/'runs'/'artifacts').resolve().as_uri()


def test_experiment_artifacts_go_beside_the_database(project):
    s = load_settings(store_dir=project/'store')
    client = s.client()
    eid = get_or_create_experiment(s, client)
    run = client.create_run(eid)
    client.log_text(run.info.run_id, 'hello', 'notes/hello.txt')
    files = list((project/'store'/'artifacts').rglob('hello.txt'))
    assert len(files) == 1 and files[0].read_text() == 'hello'
    assert not (project/'nbs'/'api'/'mlruns').exists()


SECRET = 'hunter2-s3cr3t'


def test_secrets_are_redacted_everywhere(project, monkeypatch, capsys):
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f'postgresql://ml:{SECRET}@127.0.0.1:5432/db?password={SECRET}')
    s = load_settings()
    shown = [repr(s), str(s), s._repr_markdown_(), str(s.as_params())]
    assert all(SECRET not in x for x in shown)
    assert s.as_params()['tracking_uri'] == 'postgresql://ml:***@127.0.0.1:5432/db?password=***'
    assert s.tracking_uri.count(SECRET) == 2  # the real value is still usable
    assert redact({'AWS_SECRET_ACCESS_KEY': SECRET, 'MLFLOW_TRACKING_TOKEN': SECRET, 'db_password': SECRET,
                   'api_key': SECRET, 'lr': 1}) == {'AWS_SECRET_ACCESS_KEY': '***', 'MLFLOW_TRACKING_TOKEN': '***',
                                                    'db_password': '***', 'api_key': '***', 'lr': 1}


def test_cli_info_redacts(project):
    env = {**os.environ, 'MLFLOW_TRACKING_URI': f'http://admin:{SECRET}@127.0.0.1:5999'}
    out = run_cli('info', env=env, cwd=project)
    assert SECRET not in out.stdout + out.stderr and 'http://admin:***@127.0.0.1:5999' in out.stdout


def test_apply_exports_env_file_credentials_without_overriding(project, monkeypatch):
    (project/'.env').write_text(f"AWS_SECRET_ACCESS_KEY={SECRET}\nAWS_ACCESS_KEY_ID=from-file\n")
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'from-env')
    monkeypatch.delenv('AWS_SECRET_ACCESS_KEY', raising=False)
    load_settings(store_dir=project/'s').apply()
    assert os.environ['AWS_SECRET_ACCESS_KEY'] == SECRET and os.environ['AWS_ACCESS_KEY_ID'] == 'from-env'


@pytest.mark.parametrize('layer,setup,pattern', [
    ('argument', dict(epoch=3), r"Unknown setting 'epoch' \(from argument\); did you mean 'epochs'"),
    ('settings.ini', {'ini': "[training]\nepoks = 3\n"}, r"Unknown setting 'epoks' \(from settings.ini .*\[training\]\).*'epochs'"),
    ('settings.ini', {'ini': "[trainig]\nepochs = 3\n"}, r"Unknown section \[trainig\]"),
    ('settings.ini', {'ini': "[mlflow]\nepochs = 3\n"}, r"'epochs' belongs in \[training\], not \[mlflow\]"),
    ('.env', {'dotenv': "CORONARY_MLOPS_EPOCHZ=3\n"}, r"'CORONARY_MLOPS_EPOCHZ' \(from .env\)"),
])
def test_unknown_keys(project, monkeypatch, layer, setup, pattern):
    kw = {}
    if 'env' in setup: monkeypatch.setenv(*setup['env'])
    elif 'ini' in setup: (project/'settings.ini').write_text(setup['ini'])
    elif 'dotenv' in setup: (project/'.env').write_text(setup['dotenv'])
    else: kw = setup
    with pytest.raises(SettingsError, match=pattern): load_settings(**kw)


def test_an_unknown_environment_variable_is_a_warning_and_ignored(project, monkeypatch):
    "Issue 16: a stray CORONARY_MLOPS_* in a shell profile must not stop every command"
    import coronary_mlops.config as config
    monkeypatch.setattr(config, '_WARNED', set())
    monkeypatch.setenv('CORONARY_MLOPS_BATCHSIZE', '2'); monkeypatch.setenv('CORONARY_MLOPS_SEED', '5')
    with pytest.warns(config.SettingsWarning, match=r"'CORONARY_MLOPS_BATCHSIZE' \(from environment\).*'batch_size'"):
        s = load_settings()
    assert s.seed == 5 and s.batch_size == load_settings(batch_size=None).batch_size  # the rest still applies


@pytest.mark.parametrize('key,value,pattern', [
    ('epochs', '3.5', r"'epochs' has bad value '3.5' \(from environment\): expected an integer"),
    ('epochs', 'ten', r"'epochs' has bad value 'ten'.*integer"),
    ('epochs', '0', r"'epochs' has bad value '0'.*at least 1"),
    ('learning_rate', 'fast', r"'learning_rate' has bad value 'fast'.*number"),
    ('async_upload', 'maybe', r"'async_upload' has bad value 'maybe'"),
    ('checkpoint_policy', 'latest', r"'checkpoint_policy' has bad value 'latest'.*'top_k'"),
    ('roi_size', '64,64', r"'roi_size' has bad value '64,64'.*three positive integers"),
    ('tracking_uri', 'file:./mlruns', r"'tracking_uri' has bad value 'file:./mlruns'.*refused by MLflow 3.*sqlite"),
    ('tracking_uri', './mlruns', r"'tracking_uri' has bad value './mlruns'.*file store"),
    ('tracking_uri', 'ftp://host/runs', r"'tracking_uri' has bad value 'ftp://host/runs'.*unsupported scheme 'ftp'"),
    ('registry_uri', 'file:///tmp/reg', r"'registry_uri' has bad value 'file:///tmp/reg'"),
    ('s3_endpoint_url', 'ftp://127.0.0.1', r"'s3_endpoint_url' has bad value"),
])
def test_bad_values_name_key_and_value(project, monkeypatch, key, value, pattern):
    monkeypatch.setenv(f'CORONARY_MLOPS_{key.upper()}', value)
    with pytest.raises(SettingsError, match=pattern): load_settings()


def test_bad_value_in_settings_ini_names_the_file(project):
    (project/'settings.ini').write_text("[training]\nepochs = many\n")
    with pytest.raises(SettingsError, match=r"'epochs' has bad value 'many' \(from settings.ini '.*settings.ini'\)"):
        load_settings()


def test_cli_reports_bad_value_without_traceback(project):
    out = run_cli('--tracking-uri', 'file:./mlruns', 'info', cwd=project, check=False)
    assert out.returncode == 2 and 'Traceback' not in out.stderr and "'tracking_uri' has bad value" in out.stderr


def test_repo_settings_ini_is_valid_and_says_what_it_is():
    text = (ROOT/'settings.ini').read_text()
    assert 'NOT nbdev' in text.split('[mlflow]')[0]
    s = load_settings(settings_file=ROOT/'settings.ini', environ={'HOME': '/nonexistent'})
    assert s.sources['experiment_name'] == 'settings.ini'


def test_apply_then_plain_start_run_logs_beside_the_store_not_in_cwd(clean_env):
    "The README's Python path: apply(), then mlflow.start_run() and log_epoch_artifacts, from an unrelated folder"
    code = """
import mlflow, torch
from coronary_mlops.config import load_settings
from coronary_mlops.artifacts import log_epoch_artifacts, flush, verify_run_artifacts
load_settings(settings_file=False).apply()
with mlflow.start_run() as r:
    log_epoch_artifacts(0, torch.nn.Linear(2, 2), {'val_dice': 0.5}, artifacts={'config': {'a': 1}})
    flush()
print(verify_run_artifacts(r.info.run_id).ok)
"""
    work = clean_env/'elsewhere'; work.mkdir()
    out = subprocess.run([sys.executable, '-c', code], cwd=work, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == 'True'
    store = clean_env/'xdg'/'coronary_mlops'
    assert list((store/'artifacts').rglob('config.json')) and not list(work.rglob('*'))
