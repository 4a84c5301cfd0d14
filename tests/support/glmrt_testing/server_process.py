"""A real `glmrt serve` process on a free loopback port, for the server tests."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from glmrt_testing import SUPPORT, glmrt_command, subprocess_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`glmrt serve MODEL --host 127.0.0.1 --port P ARGS...`, started on enter and stopped (SIGTERM,
    then SIGKILL) on exit. `launcher` names a module to run instead (`python -m LAUNCHER serve ...`)
    that ends in glmrt.cli.main, e.g. one that injects faults first; it then runs in tests/support
    (`python -m` puts its working directory on sys.path). `cwd`: the console script's."""

    def __init__(self, model: str | Path, *args: str, launcher: str = "glmrt", startup_timeout_s: float = 120.0,
                 cwd: Path = SUPPORT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = ["serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                 "--log-level", "warning", *args]
        self.cmd = glmrt_command(*serve) if launcher == "glmrt" else [sys.executable, "-m", launcher, *serve]
        self.cwd = cwd if launcher == "glmrt" else SUPPORT
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        # A file, not a pipe: a server that logs a lot must never block on a full pipe.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=subprocess_env(),
                                     cwd=self.cwd, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glmrt serve exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"glmrt serve did not answer /health within {self.startup_timeout_s} s")

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.output = self.read_log()
        self.log.close()

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}, without the *_created series."""
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                if not name.split("{")[0].endswith("_created"):
                    values[name] = float(value)
        return values

    def wait_idle(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Polls /metrics until nothing runs, waits or holds a KV block; -> that snapshot."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = (m["glmrt:num_requests_running"], m["glmrt:num_requests_waiting"], m["glmrt:kv_cache_usage_perc"])
            if idle == (0, 0, 0):
                return m
            assert time.monotonic() < deadline, f"server not idle after {timeout_s} s: running, waiting, kv = {idle}"
            time.sleep(0.05)
