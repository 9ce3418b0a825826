"""Start a real `loramux serve` in a subprocess for HTTP tests, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, timeout: float = 240.0, wait: bool = True):
        """Start the server; with wait=False return at once, and call `wait_ready` before using it
        (several servers then start side by side: a start is mostly one process importing)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.timeout = timeout
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--shutdown-timeout", "5", *args],  # short teardown; a test's own value comes later and wins
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)
        self._started = time.monotonic()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "ServerProcess":
        """Block until /health answers 200 (at most `timeout` s from the start); raise, with the
        log, if the server exits or does not get there."""
        deadline = self._started + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # a start takes seconds; each poll a refused connect or one request
        self.stop()
        raise RuntimeError(f"server did not become healthy in {self.timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def scrape(self) -> str:
        """One /metrics exposition: read several samples from one scrape to see one moment."""
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def metric(self, name: str, labels: str = "", text: str | None = None) -> float:
        """Sum of a Prometheus sample's values, e.g. metric('loramux_requests_total', 'finish_reason="abort"'),
        from `text` (a `scrape()`) or from a new scrape."""
        text = self.scrape() if text is None else text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def stop_all(servers) -> None:
    """Stop several servers, their shutdowns side by side."""
    for srv in servers:
        if srv.proc.poll() is None:
            srv.proc.terminate()
    for srv in servers:
        srv.stop()
