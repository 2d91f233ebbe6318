"""Nothing lost, round 3, second ring (issue 26): calls that must return by their deadline against servers that hang,
answer slowly, answer 503 forever or lose an answer; Ctrl-C in a hung flush; a tracker used again after its close gave
up on a send; a deadline met in the middle of a refused batch. Scenarios from a break-it round by a tester who had
not seen the change (S01-S11): each failed on the change as first written. One real `mlflow server` for the module,
behind a fault-injecting proxy per test (tests/servers.py `FaultProxy`)."""
import functools, signal, threading, time
import pytest
from mlflow import MlflowClient
from coronary_mlops.config import load_settings
from coronary_mlops.layout import TAG_START_ID
from coronary_mlops.tracker import MLflowTracker
import coronary_mlops.cli as cli
from servers import FaultProxy, MlflowServer
from conftest import points, sync, timed

pytestmark = pytest.mark.server
WEDGED = FaultProxy.WEDGED


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    "One mlflow server for the module: each test has its own experiment and its own proxy"
    with MlflowServer(tmp_path_factory.mktemp('srv')) as srv: yield srv


def settings(px, tmp_path, name): return load_settings(False, store_dir=str(tmp_path/'client'), tracking_uri=px.uri,
                                                       experiment_name=name)
def direct(server): return MlflowClient(server.uri)


def test_log_artifact_on_a_wedged_server_returns_by_its_deadline_and_the_file_goes_up_later(server, clean_env, tmp_path, capsys):
    "S01: log_artifact called MLflow directly: blocked 25 s with call_timeout=3"
    with FaultProxy(server.uri, WEDGED) as px:
        s = settings(px, tmp_path, 's01')
        tr = MLflowTracker(settings=s, call_timeout=3)
        run = tr.start_run(run_name='art').run_id
        tr.log_metric('x', 1.0, step=0); assert tr.flush() is True
        f = tmp_path/'report.txt'; f.write_text('hello')
        px.armed.set()
        ok, took, res = timed(lambda: tr.log_artifact(f, 'reports'), 15)
        px.release()
        tr.end_run(timeout=10); tr.close(timeout=10)
        rc, out = sync(s, capsys=capsys)
    assert ok and took < 3 + 2.5, (ok, took, res)
    assert [a.path for a in direct(server).list_artifacts(run, 'reports')] == ['reports/report.txt'] and rc == 0


def test_queries_on_a_wedged_server_raise_by_the_deadline_naming_the_server(server, clean_env, tmp_path):
    "S02: search_runs looked up its experiment with no deadline first, and hung"
    with FaultProxy(server.uri, WEDGED) as px:
        s = settings(px, tmp_path, 's02')
        tr = MLflowTracker(settings=s, call_timeout=2)
        with tr.start_run(run_name='q') as run: tr.log_metric('x', 1.0)
        tr.close(timeout=10)
        px.armed.set()
        for fn in (lambda t: t.get_run_info(run.run_id), lambda t: t.search_runs(), lambda t: t.search_runs('s02')):
            ok, took, res = timed(lambda: fn(MLflowTracker(settings=s, call_timeout=2)), 15)
            assert ok and took < 2 + 2.5 and isinstance(res, TimeoutError) and '127.0.0.1' in str(res), (took, res)


@pytest.mark.parametrize('kind', ['offline-run', 'existing-run'])
def test_sync_on_a_wedged_server_exits_1_by_its_deadline(server, clean_env, tmp_path, monkeypatch, capsys, kind):
    "S03: sync created an offline run with no deadline: still running at 100 s"
    with FaultProxy(server.uri, WEDGED) as px:
        s = settings(px, tmp_path, f's03{kind}')
        tr = MLflowTracker(settings=s, call_timeout=2)
        if kind == 'offline-run': px.armed.set(); assert tr.start_run(run_name='off').local_id.startswith('offline-')
        else: tr.start_run(run_name='on'); tr.log_metric('loss', 0.0); tr.flush(); px.armed.set()
        for i in range(1, 6): tr.log_metric('loss', float(i), step=i)
        tr.end_run(timeout=1); tr.close(timeout=2)
        assert MLflowTracker(settings=s).pending > 0
        monkeypatch.setattr(cli, 'MLflowTracker', functools.partial(cli.MLflowTracker, call_timeout=2))
        ok, took, rc = timed(lambda: cli.main(['--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync']), 30)
    assert ok and rc == 1 and took < 2 * 3 + 6, (ok, took, rc)


@pytest.mark.parametrize('how', ['end_run', 'close'])
def test_ending_a_parent_with_an_open_child_on_a_wedged_server_keeps_one_deadline(server, clean_env, tmp_path, capsys, how):
    "S04: each child got the whole timeout, and MLflow's own end_run 2 s more per run: 12 s for timeout=5"
    with FaultProxy(server.uri, WEDGED) as px:
        s = settings(px, tmp_path, f's04{how}')
        tr = MLflowTracker(settings=s, call_timeout=2)
        parent = tr.start_run(run_name='parent'); child = tr.start_run(run_name='child', nested=True)
        for i in range(20): tr.log_metric('loss', float(i), step=i)
        assert tr.flush() is True
        px.armed.set()
        for i in range(20, 40): tr.log_metric('loss', float(i), step=i)
        t0 = time.monotonic()
        if how == 'end_run': tr.end_run(run_id=parent.run_id, timeout=5)
        else: tr.close(timeout=5)
        took = time.monotonic() - t0
        tr.close(timeout=5); px.release()
        rc, out = sync(s, capsys=capsys)
    c = direct(server)
    assert took < 5 + 1.5, took
    assert points(c, child.run_id, 'loss') == [(i, float(i)) for i in range(40)]
    assert {c.get_run(r.run_id).info.status for r in (parent, child)} == {'FINISHED'} and rc == 0


def test_ctrl_c_during_a_hung_flush_loses_no_record(server, clean_env, tmp_path, monkeypatch, capsys):
    "S05: the records a flush had taken were dropped by a KeyboardInterrupt: 0 of 50 reached the store"
    monkeypatch.setenv('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '0'); monkeypatch.setenv('MLFLOW_HTTP_REQUEST_TIMEOUT', '3')
    with FaultProxy(server.uri, [(r'POST .*/runs/log-batch', ('hang',))]) as px:
        s = settings(px, tmp_path, 's05')
        tr = MLflowTracker(settings=s, call_timeout=30, flush_interval=600)  # the worker stays asleep
        run = tr.start_run(run_name='ctrlc').run_id
        for i in range(50): tr.log_metric('loss', float(i), step=i)
        px.armed.set()
        timer = threading.Timer(1.0, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt): tr.flush()
        timer.cancel()
        assert len(tr.queue.buf) == 50  # back in memory, in order
        px.release(); time.sleep(3.5)  # the abandoned request gives up by itself
        tr.end_run(timeout=10); tr.close(timeout=10)
        rc, out = sync(s, capsys=capsys)
    assert points(direct(server), run, 'loss') == [(i, float(i)) for i in range(50)] and rc == 0


def test_a_server_slower_than_the_call_deadline_loses_nothing_and_every_call_returns_in_time(server, clean_env, tmp_path, capsys):
    "S07: every log_batch takes 2 s, the deadline is 1 s: what was cut off goes up at sync"
    with FaultProxy(server.uri, [(r'POST .*/runs/log-batch', ('delay', 2.0))]) as px:
        s = settings(px, tmp_path, 's07')
        tr = MLflowTracker(settings=s, call_timeout=1, flush_interval=600)
        run = tr.start_run(run_name='slow').run_id
        px.armed.set()
        for i in range(10): tr.log_metric('loss', float(i), step=i)
        t0 = time.monotonic(); tr.flush(raise_errors=False); t_flush = time.monotonic() - t0
        t0 = time.monotonic(); tr.end_run(timeout=4); t_end = time.monotonic() - t0
        t0 = time.monotonic(); tr.close(timeout=4); t_close = time.monotonic() - t0
        rc, out = sync(s, capsys=capsys)  # the CLI's deadline is above the 2 s
    c = direct(server)
    assert t_flush < 1 + 5.5 + 1 and t_end < 5.5 and t_close < 5.5, (t_flush, t_end, t_close)
    assert points(c, run, 'loss') == [(i, float(i)) for i in range(10)] and c.get_run(run).info.status == 'FINISHED'


def test_an_api_that_answers_503_forever_is_away_and_its_offline_run_is_created_once(server, clean_env, tmp_path, monkeypatch, capsys):
    "S08: /health said 200, the API 503: sync retried the creation under MLflow's backoff for minutes"
    with FaultProxy(server.uri, [(r' /api/', ('status', 503))]) as px:
        s = settings(px, tmp_path, 's08')
        px.armed.set()
        tr = MLflowTracker(settings=s, call_timeout=2)
        ok, took, run = timed(lambda: tr.start_run(run_name='r503'), 30)
        assert ok and run.local_id.startswith('offline-') and took < 2 + 5.5, (took, run)
        for i in range(5): tr.log_metric('loss', float(i), step=i)
        tr.end_run(timeout=2); tr.close(timeout=3)
        monkeypatch.setattr(cli, 'MLflowTracker', functools.partial(cli.MLflowTracker, call_timeout=2))
        argv = ['--store-dir', s.store_dir, '--tracking-uri', s.tracking_uri, 'sync']
        ok, took, rc = timed(lambda: cli.main(argv), 40)
        assert ok and rc == 1 and took < 20, (ok, took, rc)
        px.release()
        assert cli.main(argv) == 0
    c = direct(server)
    [r] = c.search_runs([c.get_experiment_by_name('s08').experiment_id], "tags.mlflow.runName = 'r503'")
    assert points(c, r.info.run_id, 'loss') == [(i, float(i)) for i in range(5)]


def test_a_run_creation_whose_answer_was_lost_makes_exactly_one_run(server, clean_env, tmp_path, capsys):
    "S09: MLflow's client sent runs/create again once the held connection dropped: two runs had the start id"
    with FaultProxy(server.uri, [(r'POST .*/runs/create', ('hang_after',))]) as px:
        s = settings(px, tmp_path, 's09')
        tr = MLflowTracker(settings=s, call_timeout=2)
        tr.experiment_id  # the experiment exists: only runs/create loses its answer
        px.armed.set()
        run = tr.start_run(run_name='lost-answer')
        for i in range(5): tr.log_metric('loss', float(i), step=i)
        tr.end_run(timeout=2); tr.close(timeout=3)
        px.release(); time.sleep(3)  # whatever the abandoned call does once its connection drops
        rc, out = sync(s, capsys=capsys)
    c = direct(server)
    key = run.local_id.removeprefix('offline-')
    runs = c.search_runs([c.get_experiment_by_name('s09').experiment_id], f"tags.`{TAG_START_ID}` = '{key}'")
    assert run.local_id.startswith('offline-') and rc == 0
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    assert points(c, runs[0].info.run_id, 'loss') == [(i, float(i)) for i in range(5)]


def test_a_tracker_used_again_after_a_close_that_gave_up_on_a_send_loses_nothing(server, clean_env, tmp_path, capsys, monkeypatch):
    "S10: a flag set when close() handed a hung send's records to the spool was never reset: later failures dropped theirs"
    monkeypatch.setenv('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '0'); monkeypatch.setenv('MLFLOW_HTTP_REQUEST_TIMEOUT', '30')
    with FaultProxy(server.uri, [(r'POST .*/runs/log-batch', ('hang',))]) as px:
        s = settings(px, tmp_path, 's10')
        tr = MLflowTracker(settings=s, call_timeout=30, flush_interval=0.2)
        first = tr.start_run(run_name='first').run_id
        px.armed.set()
        for i in range(10): tr.log_metric('loss', float(i), step=i)
        t0 = time.monotonic()
        while px.held < 1 and time.monotonic() - t0 < 10: time.sleep(0.1)  # the worker waits on the server
        tr.close(timeout=2)
        assert tr.queue._orphan is not None  # close gave up on the send and kept its records
        px.release(); time.sleep(1)
        tr.sync()
        px._drop.clear(); px.armed.set(); tr.queue.call_timeout = 1
        second = tr.start_run(run_name='second').run_id
        for i in range(10): tr.log_metric('acc', float(i), step=i)
        time.sleep(3)  # the worker sends, its 1 s deadline passes
        px.release(); time.sleep(1)
        tr.end_run(timeout=10); tr.close(timeout=10)
        rc, out = sync(s, capsys=capsys)
    c = direct(server)
    assert points(c, first, 'loss') == [(i, float(i)) for i in range(10)]
    assert points(c, second, 'acc') == [(i, float(i)) for i in range(10)] and rc == 0


def test_a_deadline_inside_a_refused_batch_keeps_the_later_steps_and_sets_the_refusal_aside(server, clean_env, tmp_path):
    "S11: a Late raised while a refused batch was retried record by record carried only that batch: 10 of 10 of another run lost"
    c = direct(server)
    eid = c.create_experiment('s11')
    r1 = c.create_run(eid, run_name='refused-param').info.run_id
    c.log_param(r1, 'lr', '1')  # set by someone else: the tracker's lr=2 is refused by the server
    r2 = c.create_run(eid, run_name='innocent').info.run_id
    with FaultProxy(server.uri, [(r'POST .*/runs/log-batch', ('delay', 0.25))]) as px:
        s = settings(px, tmp_path, 's11')
        tr = MLflowTracker(settings=s, call_timeout=30, flush_interval=600)
        tr.log_param('lr', '2', run_id=r1)
        for i in range(40): tr.log_metric('loss', float(i), step=i, run_id=r1)
        for i in range(10): tr.log_metric('acc', float(i), step=i, run_id=r2)
        px.armed.set()
        assert tr.flush(timeout=2, raise_errors=False) is False
        px.armed.clear()
        deadline = time.monotonic() + 60
        while not tr.flush(raise_errors=False) and time.monotonic() < deadline: time.sleep(0.2)
        tr.close(timeout=10)
    assert points(c, r1, 'loss') == [(i, float(i)) for i in range(40)]
    assert points(c, r2, 'acc') == [(i, float(i)) for i in range(10)]
    assert sum(len(f.read_text().splitlines()) for f in tr.queue.set_aside()) == 1  # the param, named
