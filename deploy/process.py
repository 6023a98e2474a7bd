"""``diffss-serve`` in a child process on a free loopback port: for integration tests,
benchmarks and scripts that need a real server rather than the app in-process."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start ``python -m deploy.server`` serving ``model_repository`` and wait until it is ready.

    ``extra_args`` go to the command line (e.g. ``"--token", "t"``); its output goes to
    ``log_path``. ``stop()`` ends it and returns the log.
    """

    def __init__(self, model_repository: str | Path, log_path: str | Path, *extra_args: str, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.server", "--model-repository", str(model_repository),
             "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *extra_args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()}")
            if self._status("/v2/health/ready") == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up within {timeout:.0f} s: {self.log_path.read_text()}")

    def _status(self, path: str) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:  # not listening yet, or gone
            return None
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None and self._status("/v2/health/live") == 200

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.log_path.read_text()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
