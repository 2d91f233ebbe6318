"The `coronary-mlops` command end to end, as a new user runs it: a real process and a real embedded store"
import os
from mlflow import MlflowClient
from conftest import run_cli


def test_demo_logs_a_finished_run_into_the_default_store_from_any_folder(clean_env):
    env = {**os.environ}
    (clean_env/'a').mkdir(); (clean_env/'b').mkdir()
    outs = [run_cli('demo', '--steps', '15', env=env, cwd=clean_env/d).stdout for d in 'ab']
    db = (clean_env/'xdg'/'coronary_mlops'/'mlflow.db').resolve()
    assert db.exists() and all(f'sqlite:///{db}' in o for o in outs)
    assert all('mlflow ui --backend-store-uri' in o and 'nbs/index.ipynb' in o for o in outs)
    client = MlflowClient(f'sqlite:///{db}')
    runs = client.search_runs([client.get_experiment_by_name('coronary-segmentation').experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {'FINISHED'}
    assert {r.info.run_id for r in runs} == {o.split('run ')[1].split()[0] for o in outs}
    hist = client.get_metric_history(runs[0].info.run_id, 'train_loss')
    assert [m.step for m in hist] == list(range(15)) and hist[-1].value < hist[0].value
    assert runs[0].data.params['epochs'] == '20'
    assert not list(clean_env.glob('*/mlruns')) and not list(clean_env.glob('*/mlflow.db'))


def test_info_shows_sources(clean_env):
    env = {**os.environ, 'CORONARY_MLOPS_EPOCHS': '7'}
    out = run_cli('info', env=env, cwd=clean_env).stdout
    line = next(l for l in out.splitlines() if l.strip().startswith('epochs'))
    assert line.split() == ['epochs', '7', 'environment']
