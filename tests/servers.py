"Real servers on loopback for the tests: PostgreSQL databases, SeaweedFS's S3 gateway and `mlflow server`; always stopped"
import os, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import psutil

BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get('CORONARY_TEST_PG', 'postgresql://postgres@127.0.0.1:5432/postgres')
S3_ENV = {'AWS_ACCESS_KEY_ID': 'coronary-test', 'AWS_SECRET_ACCESS_KEY': 'coronary-test-secret', 'AWS_DEFAULT_REGION': 'us-east-1'}


def free_port() -> int:
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    return port


def free_ports(n) -> list:
    "n distinct free ports whose +10000 neighbours are free too (SeaweedFS derives gRPC ports that way)"
    out = []
    while len(out) < n:
        p = free_port()
        if p < 55000 and p not in out:
            try:
                s = socket.socket(); s.bind(('127.0.0.1', p + 10000)); s.close(); out.append(p)
            except OSError: pass
    return out


def kill_tree(proc, sig=signal.SIGKILL):
    "Kill `proc` and every process it started (uvicorn workers may sit in other process groups)"
    if proc is None: return
    try: procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess: procs = []
    for p in procs:
        try: p.send_signal(sig)
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def wait_http(url, proc, log, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f"{url}: process exited: {Path(log).read_text()[-3000:]}")
        try: urllib.request.urlopen(url, timeout=1); return
        except urllib.error.HTTPError: return  # it answers, even if with 4xx
        except OSError: time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {Path(log).read_text()[-3000:]}")


class PostgresDB:
    "A temporary database on the machine's PostgreSQL, created on enter and dropped on exit"
    def __init__(self, admin_uri=PG_ADMIN): self.admin_uri, self.name = admin_uri, f"coronary_test_{uuid.uuid4().hex[:10]}"

    @property
    def uri(self):
        "SQLAlchemy URI of the database, naming the psycopg2 driver (SQLAlchemy's default for postgresql:// is psycopg 3)"
        return self.admin_uri.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg2://', 1) + '/' + self.name

    def _exec(self, *sql):
        import psycopg2
        con = psycopg2.connect(self.admin_uri); con.autocommit = True
        try:
            with con.cursor() as c:
                for s in sql: c.execute(s)
        finally: con.close()

    def __enter__(self): self._exec(f'CREATE DATABASE "{self.name}"'); return self
    def __exit__(self, *exc):
        self._exec(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}' AND pid <> pg_backend_pid()",
                   f'DROP DATABASE IF EXISTS "{self.name}"')


class SeaweedS3:
    "SeaweedFS (`weed server -s3`) on loopback ports and a temporary folder, with one bucket"
    def __init__(self, root, bucket='mlflow'):
        self.root, self.bucket, self.proc = Path(root), bucket, None
        self.master, self.volume, self.filer, self.s3 = free_ports(4)

    @property
    def endpoint(self): return f"http://127.0.0.1:{self.s3}"

    def start(self, timeout=90):
        (self.root/'data').mkdir(parents=True, exist_ok=True)
        log = self.root/'weed.log'
        cmd = [str(BIN/'weed'), 'server', f"-dir={self.root/'data'}", '-ip=127.0.0.1', '-ip.bind=127.0.0.1',
               f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
               f"-filer.localSocket={self.root/'filer.sock'}", '-s3', f"-s3.port={self.s3}", '-s3.port.iceberg=0',
               '-s3.port.lance=0', '-iam=false', '-master.volumeSizeLimitMB=64', '-volume.max=0']
        self.proc = subprocess.Popen(cmd, stdout=open(log, 'ab'), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(f"{self.endpoint}/", self.proc, log, timeout)
            import boto3
            s3 = boto3.client('s3', endpoint_url=self.endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != 'AWS_DEFAULT_REGION'},
                              region_name='us-east-1')
            t0 = time.time()
            while True:  # the gateway answers before the filer behind it is ready
                try: s3.create_bucket(Bucket=self.bucket); break
                except Exception:
                    if time.time() - t0 > timeout: raise
                    time.sleep(0.5)
        except BaseException: self.stop(); raise
        return self

    def stop(self): kill_tree(self.proc); self.proc = None
    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


class MlflowServer:
    "`mlflow server` on loopback: SQLite (or `backend`) metadata, proxied artifacts in `root` (or `artifacts`); restartable"
    def __init__(self, root, port=None, backend=None, artifacts=None, app_name=None, env=None):
        self.root, self.port = Path(root), port or free_port()
        self.backend = backend or f"sqlite:///{self.root/'server.db'}"
        self.artifacts = artifacts or str(self.root/'artifacts')
        self.app_name, self.env, self.proc = app_name, dict(env or {}), None

    @property
    def uri(self): return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=90):
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root/'server.log'
        env = {**os.environ, 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false', **self.env}  # no background job workers
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): env.pop(k, None)
        cmd = [str(BIN/'mlflow'), 'server', '--backend-store-uri', self.backend, '--artifacts-destination', self.artifacts,
               '--host', '127.0.0.1', '--port', str(self.port), '--workers', '1']
        if self.app_name: cmd += ['--app-name', self.app_name]
        self.proc = subprocess.Popen(cmd, stdout=open(log, 'ab'), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try: wait_http(f"{self.uri}/health", self.proc, log, timeout)
        except BaseException: self.stop(); raise
        return self

    def stop(self, sig=signal.SIGKILL): kill_tree(self.proc, sig); self.proc = None
    def restart(self): self.stop(); return self.start()
    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


class FaultProxy:
    """An HTTP proxy on loopback in front of `target`. While `armed` is set, each call is matched against `rules`, a
    list of (regex on 'METHOD path', action) checked in order: ('hang',) holds the call before forwarding it;
    ('hang_after',) forwards it, then holds the answer; ('delay', s) forwards it after `s` seconds; ('status', code)
    answers `code` at once. Held calls are dropped (connection closed), never forwarded, on `release()` or when the
    proxy stops. `held` counts the calls held; `forwarded` lists the calls that reached the server."""
    WEDGED = [(r' /api/', ('hang',))]  # a server whose database is stuck: /health answers, the API hangs

    def __init__(self, target, rules=WEDGED):
        import re, threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import requests
        self.target, self.rules, self.armed, self._drop = target.rstrip('/'), list(rules), threading.Event(), threading.Event()
        self.held, self.forwarded = 0, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'
            def log_message(self, *a): pass
            def _any(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                what = f"{self.command} {self.path}"
                act = next((a for rx, a in proxy.rules if re.search(rx, what)), None) if proxy.armed.is_set() else None
                if act and act[0] == 'hang':
                    proxy.held += 1; proxy._drop.wait(600); self.close_connection = True; return
                if act and act[0] == 'status':
                    msg = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}'
                    self.send_response(act[1]); self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(msg))); self.end_headers(); self.wfile.write(msg); return
                if act and act[0] == 'delay': time.sleep(act[1])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ('host', 'content-length', 'connection')}
                r = requests.request(self.command, proxy.target + self.path, headers=headers, data=body, timeout=120)
                proxy.forwarded.append(what)
                if act and act[0] == 'hang_after':
                    proxy.held += 1; proxy._drop.wait(600); self.close_connection = True; return
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ('content-length', 'transfer-encoding', 'connection', 'content-encoding'): self.send_header(k, v)
                self.send_header('Content-Length', str(len(r.content))); self.end_headers(); self.wfile.write(r.content)
            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.port, self._thread = self.server.server_address[1], threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def uri(self): return f"http://127.0.0.1:{self.port}"
    def release(self): self.armed.clear(); self._drop.set()
    def __enter__(self): self._thread.start(); return self
    def __exit__(self, *exc): self.release(); self.server.shutdown(); self.server.server_close()
