"Real servers on loopback for the tests: started in a new session, and always stopped"
import os, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    return port


class MlflowServer:
    "`mlflow server` with a SQLite backend and proxied artifacts in `root`; restartable on the same port"
    def __init__(self, root, port=None, backend=None):
        self.root, self.port = Path(root), port or free_port()
        self.backend = backend or f"sqlite:///{self.root/'server.db'}"
        self.proc = None

    @property
    def uri(self): return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=60):
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root/'server.log', 'ab')
        env = {**os.environ, 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}  # no background job workers
        self.proc = subprocess.Popen(
            [str(BIN/'mlflow'), 'server', '--backend-store-uri', self.backend, '--artifacts-destination',
             str(self.root/'artifacts'), '--host', '127.0.0.1', '--port', str(self.port), '--workers', '1'],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None: raise RuntimeError(f"mlflow server exited: {(self.root/'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1); return self
            except OSError: time.sleep(0.2)
        self.stop(); raise TimeoutError("mlflow server did not start")

    def stop(self, sig=signal.SIGKILL):
        "Kill the server and every process it started (uvicorn workers may sit in other process groups)"
        if self.proc is None: return
        try: procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess: procs = []
        for p in procs:
            try: p.send_signal(sig)
            except psutil.NoSuchProcess: pass
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait(timeout=30); self.proc = None

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()
