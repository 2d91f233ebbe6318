"The `coronary-mlops` command end to end, as a new user runs it: a real process and a real embedded store"
import os, signal, subprocess, time
import pytest
from mlflow import MlflowClient
from conftest import run_cli, BIN

SMALL = ['--epochs', '2', '--roi', '32', '--synthetic', '4']


def test_demo_logs_a_finished_registered_run_into_the_default_store_from_any_folder(clean_env):
    env = {**os.environ}
    (clean_env/'a').mkdir(); (clean_env/'b').mkdir()
    # issue 16: a stray variable with the kit's prefix (in b's shell) is a warning, not a reason to stop
    procs = [run_cli('demo', *SMALL, env={**env, **({'CORONARY_MLOPS_HOME': '/x'} if d == 'b' else {})}, cwd=clean_env/d)
             for d in 'ab']
    outs = [p.stdout for p in procs]
    assert "Unknown setting 'CORONARY_MLOPS_HOME'" in procs[1].stderr and 'It is ignored' in procs[1].stderr
    for p in procs:  # output to a pipe: one line per epoch, no redrawn bars, no MONAI FutureWarning
        assert 'FutureWarning' not in p.stderr and '\r' not in p.stderr, p.stderr[-2000:]
        assert [l.split(':')[0] for l in p.stderr.splitlines() if l.startswith('epoch ')] == ['epoch 1/2', 'epoch 2/2']
    db = (clean_env/'xdg'/'coronary_mlops'/'mlflow.db').resolve()
    assert db.exists() and all(f'sqlite:///{db}' in o for o in outs)
    assert all('mlflow ui --backend-store-uri' in o and '01_quickstart.ipynb' in o and 'ArtifactBrowser()' in o and 'best validation Dice' in o for o in outs)
    client = MlflowClient(f'sqlite:///{db}', registry_uri=f'sqlite:///{db}')  # not the process-wide registry URI of earlier tests
    runs = client.search_runs([client.get_experiment_by_name('coronary-segmentation').experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {'FINISHED'}
    assert {r.info.run_id for r in runs} == {o.split('run ')[1].split()[0] for o in outs}
    hist = client.get_metric_history(runs[0].info.run_id, 'train_loss')
    assert [m.step for m in hist] == [0, 1]
    assert runs[0].data.params['epochs'] == '2' and runs[0].data.params['roi_size'] == '[32,32,32]'
    champ = client.get_model_version_by_alias('coronary-segmentation', 'champion')
    assert champ.run_id in {r.info.run_id for r in runs}
    # issue 16: what the stock UI shows of a run made by fluent `mlflow.start_run()`, and more
    exp = client.get_experiment_by_name('coronary-segmentation')
    assert exp.tags['mlflow.experimentKind'] == 'custom_model_development'
    run = client.get_run(champ.run_id)
    assert run.data.tags['mlflow.user'] and run.data.tags['mlflow.source.type'] == 'LOCAL'
    assert run.data.tags['mlflow.source.name'].endswith('coronary-mlops')
    assert run.data.tags['mlflow.note.content'].startswith('**Best validation Dice')
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ['phantoms/test', 'phantoms/train', 'phantoms/val']
    assert {d.tags[0].value for d in inputs.values()} == {'training', 'validation', 'test'}
    assert champ.tags['dataset_digest'] == run.data.params['dataset_digest'] and 'val_dice' in champ.tags
    assert 'coronary-mlops predict models:/' in champ.description and 'mlflow models serve' in champ.description
    assert not list(clean_env.glob('*/mlruns')) and not list(clean_env.glob('*/mlflow.db'))


def test_info_shows_sources(clean_env):
    env = {**os.environ, 'CORONARY_MLOPS_EPOCHS': '7'}
    out = run_cli('info', env=env, cwd=clean_env).stdout
    line = next(l for l in out.splitlines() if l.strip().startswith('epochs'))
    assert line.split() == ['epochs', '7', 'environment']


def test_train_bad_data_is_one_clear_line(clean_env):
    (clean_env/'empty').mkdir()
    p = run_cli('train', '--data', str(clean_env/'empty'), check=False, cwd=clean_env)
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert 'No image/label pairs' in p.stderr and '--synthetic N' in p.stderr
    p = run_cli('train', '--synthetic', '2', '--epochs', '1', check=False, cwd=clean_env)
    assert p.returncode == 2 and '2 cases cannot be split' in p.stderr
    p = run_cli('train', '--synthetic', '3', '--roi', '50', check=False, cwd=clean_env)
    assert p.returncode == 2 and 'must be divisible by 8' in p.stderr


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)  # SIGHUP: SIGTERM's path
def test_ctrl_c_ends_the_run_killed_and_keeps_the_last_checkpoint(clean_env, sig):
    """A real SIGINT (Ctrl-C), SIGTERM (SLURM, Kubernetes) or SIGHUP to a real training process, once its first
    checkpoint is in the store. --patience 1000: early stopping must not end the run before the signal arrives (on a
    busy machine the first upload lags the epochs, and a run that had finished exited 0: the interrupt was never sent
    to a training process)"""
    store = clean_env/'xdg'/'coronary_mlops'
    proc = subprocess.Popen([str(BIN/'coronary-mlops'), 'train', '--synthetic', '4', '--epochs', '200', '--roi', '32',
                             '--patience', '1000'],
                            cwd=clean_env, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not list((store/'artifacts').rglob('checkpoints/epoch_*/model.pt')):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() - t0 < 240, 'no checkpoint appeared'
            time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill()
    says = 'interrupted' if sig == signal.SIGINT else f'terminated by {signal.Signals(sig).name}'
    assert proc.returncode == 128 + sig and says in err and 'Traceback' not in err, (proc.returncode, err[-2000:])
    client = MlflowClient(f"sqlite:///{store/'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name('coronary-segmentation').experiment_id])
    reason = 'KeyboardInterrupt' if sig == signal.SIGINT else f'Terminated: {signal.Signals(sig).name}'
    assert run.info.status == 'KILLED' and run.data.tags['coronary_mlops.end_reason'].startswith(reason)
    from coronary_mlops.artifacts import load_checkpoint
    ckpt = client.download_artifacts(run.info.run_id, run.data.tags['coronary_mlops.best_checkpoint'], str(clean_env/'dl'))
    state = load_checkpoint(ckpt)
    assert set(state) == {'model', 'optimizer', 'scheduler', 'epoch'} and state['epoch'] >= 0
    assert not list((store/'staging').glob('*')) if (store/'staging').exists() else True  # nothing left in staging


def test_every_train_config_field_is_an_option_and_store_options_follow_the_subcommand(capsys):
    "The options come from TrainConfig (fields, types, docments); --experiment works after `train` as a new user types it"
    from dataclasses import fields
    from fastcore.docments import docments
    from coronary_mlops.cli import cli_parser
    from coronary_mlops.train import TrainConfig
    a = cli_parser().parse_args(['train', '--experiment', 'X', '--synthetic', '4', '--store-dir', 'S', '--tracking-uri', 'U'])
    assert (a.command, a.experiment_name, a.store_dir, a.tracking_uri, a.synthetic) == ('train', 'X', 'S', 'U', 4)
    assert cli_parser().parse_args(['--experiment', 'Y', 'train', '--synthetic', '4']).experiment_name == 'Y'
    OTHER = {'blend': 'constant'}  # a valid value of each text option other than its default
    for cmd in (['train', '--synthetic', '4'], ['demo']):
        argv = list(cmd)
        unset = {'pixdim': (0.4, 0.4, 0.5), 'window': (-100.0, 600.0), 'roi_size': (32, 32, 16),
                     'steps_per_epoch': 7}  # planned when unset: a value of each
        for f in fields(TrainConfig):  # each field set to a value other than its default
            opt = '--' + f.name.replace('_', '-')
            v = unset.get(f.name)
            if f.default is None: argv.append(f"{opt}={','.join(map(str, v)) if isinstance(v, tuple) else v}")  # = lets a value start with -
            elif isinstance(f.default, bool): argv.append(f"--{'no-' if f.default else ''}{f.name.replace('_', '-')}")
            elif isinstance(f.default, tuple): argv += [opt, ','.join(str(x * 2) for x in f.default)]
            elif isinstance(f.default, str): argv += [opt, OTHER[f.name]]
            else: argv += [opt, str(f.default + 1)]
        got = vars(cli_parser().parse_args(argv))
        want = {f.name: unset[f.name] if f.default is None else not f.default if isinstance(f.default, bool) else
                tuple(x * 2 for x in f.default) if isinstance(f.default, tuple) else OTHER[f.name] if isinstance(f.default, str)
                else f.default + 1 for f in fields(TrainConfig)}
        assert {k: got[k] for k in want} == want
    old = cli_parser().parse_args(['train', '--synthetic', '4', '--lr', '0.1', '--roi', '32', '--no-amp', '--batch-size', '3',
                                   '--num-workers', '1'])
    assert (old.learning_rate, old.roi_size, old.amp, old.batch_size, old.num_workers) == (0.1, (32, 32, 32), False, 3, 1)
    with pytest.raises(SystemExit): cli_parser().parse_args(['train', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert all(f"{doc} (default: " in out for k, doc in docments(TrainConfig).items() if k != "return")
    assert '--weight-decay X AdamW' in out and '--amp, --no-amp' in out and '--fractions TRAIN,VAL,TEST' in out


def test_damaged_volumes_are_one_clear_line_naming_the_file_and_create_no_run(clean_env, capsys):
    "Issue 12: a truncated .nii.gz, a label that is not gzip and a 4-D image, caught from headers before any run"
    import nibabel as nib, numpy as np
    from coronary_mlops.cli import main
    from coronary_mlops.data import PhantomConfig, make_phantom, save_nifti
    store = clean_env/'store'

    def folder(name):
        d = clean_env/name
        for i in range(3):
            ph = make_phantom(i, PhantomConfig(shape=(24, 24, 24)))
            save_nifti(ph['image'], ph['spacing'], d/f'{i}.img.nii.gz'); save_nifti(ph['label'], ph['spacing'], d/f'{i}.label.nii.gz')
        return d

    cut = folder('truncated')/'1.img.nii.gz'; cut.write_bytes(cut.read_bytes()[:-100])
    plain = folder('notgz')/'2.label.nii.gz'
    nib.save(nib.load(plain), clean_env/'plain.nii'); plain.write_bytes((clean_env/'plain.nii').read_bytes())
    four = folder('fourd')/'0.img.nii.gz'
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 24, 2), np.int16), np.eye(4)), four)
    for bad, says in ((cut, 'truncated'), (plain, 'really gzip-compressed'), (four, 'is 4-D (shape (24, 24, 24, 2))')):
        rc = main(['--store-dir', str(store), 'train', '--data', str(bad.parent), '--epochs', '1'])
        err = capsys.readouterr().err
        assert rc == 2 and str(bad) in err and says in err and 'Traceback' not in err, err
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # no run was created
