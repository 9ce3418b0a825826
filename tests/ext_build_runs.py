"""Run python snippets as concurrent subprocesses with a hard deadline, for the extension-build
tests: a loader that hangs (a stale lock) must fail its test, not stall CI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    rc: int | None  # None: killed at the deadline
    stdout: str
    stderr: str

    def result(self) -> dict:
        """The JSON object the script printed last; fails the test if the script hung or failed."""
        state = "hung (killed at the deadline)" if self.rc is None else f"exited {self.rc}"
        assert self.rc == 0, f"loader {state}:\n{self.stderr[-3000:]}"
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_together(scripts: list[str], timeout_s: float, env: dict[str, str] | None = None) -> list[Run]:
    """Start every `python -c script` at once (from the repo root, so its code is imported), wait
    until all exit or `timeout_s` passes, then kill the stragglers' process groups (ninja and
    the compiler included)."""
    procs = [subprocess.Popen([sys.executable, "-c", s], cwd=ROOT, env=env, text=True, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in scripts]
    deadline = time.monotonic() + timeout_s
    runs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            runs.append(Run(p.returncode, out, err))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            runs.append(Run(None, out, err))
    return runs
