import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    "An environment with no MLflow or kit variables, HOME and XDG_DATA_HOME in a temporary folder"
    for k in list(os.environ):
        if k.startswith(('MLFLOW_', 'CORONARY_MLOPS_')): monkeypatch.delenv(k)
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path/'xdg'))
    return tmp_path


def run_cli(*args, env=None, cwd=None, check=True):
    "Run the installed `coronary-mlops` command and return the CompletedProcess"
    exe = shutil.which('coronary-mlops', path=str(BIN)) or 'coronary-mlops'
    return subprocess.run([exe, *args], env=env, cwd=cwd, capture_output=True, text=True, check=check, timeout=300)
