"""Run ``skipserve serve`` as a child process: for tests, benchmarks and anyone scripting a server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class ServerProcess:
    """``with ServerProcess(checkpoint) as server:`` starts a server on free loopback ports and stops it.

    ``server.url`` is the HTTP root, ``server.metrics_url`` Ray's Prometheus endpoint; the server's
    output goes to ``log`` (a file), which the error message points at when the start fails.
    """

    def __init__(self, checkpoint: str | os.PathLike, *args: str, log: Optional[str | os.PathLike] = None,
                 start_timeout_s: float = 300.0, env: Optional[dict] = None, direct: bool = False):
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.cmd = [sys.executable, "-m", "skipserve", "serve", "--checkpoint", str(checkpoint),
                    "--port", str(self.port), "--metrics-port", str(self.metrics_port), *args]
        # direct: the replica's own HTTP server too (``--direct-port``), at ``direct_url``
        self.direct_url: Optional[str] = None
        if direct:
            direct_port = free_port()
            self.direct_url = f"http://127.0.0.1:{direct_port}"
            self.cmd += ["--direct-port", str(direct_port)]
        self.log_path = Path(log) if log else Path(os.devnull)
        self.start_timeout_s = start_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        # its own process group, so that stopping it reaches Ray's children too
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close()
                raise RuntimeError(f"skipserve serve exited with {self.proc.returncode} before it was ready; "
                                   f"see {self.log_path}")
            if self.ready():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"skipserve serve was not ready within {self.start_timeout_s:.0f}s; see {self.log_path}")

    def ready(self) -> bool:
        return all(_ready(url) for url in (self.url, self.direct_url) if url)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:  # whatever Ray left behind in the server's process group
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __exit__(self, *exc) -> None:
        self.stop()
