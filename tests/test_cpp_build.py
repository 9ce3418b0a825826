"""kernels/cpp_build.py: a JIT build never waits forever on a dead builder's lock, waits for a
live one only a bounded, logged time, and concurrent first loads build once and all load.

A tiny C source (no torch headers, compiles in about a second) stands in for the real
extension, so these tests stay fast; tests/test_paged_attention.py runs the real one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch.utils.file_baton import FileBaton

from ext_build_runs import ROOT, run_together
from kernels import cpp_build

_SRC = 'extern "C" int loramux_test_answer() { return 42; }\n'

# Loads the tiny library into a fresh process and reports what cpp_build did.
_LOAD = """
import ctypes, json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from kernels import cpp_build
path, compiled = cpp_build.load_library("loramux_test_answer", [{src!r}], Path({dir!r}), ["-O0"], [])
print(json.dumps({{"compiled": compiled, "answer": ctypes.CDLL(path).loramux_test_answer()}}))
"""


@pytest.fixture
def tiny(tmp_path):
    src = tmp_path / "answer.cpp"
    src.write_text(_SRC)
    return _LOAD.format(src=str(src), dir=str(tmp_path / "build")), tmp_path / "build"


def test_stale_baton_of_a_killed_build_does_not_hang(tiny):
    """What a builder killed inside cpp_extension.load leaves: torch's `lock` file (created by
    FileBaton exactly as torch does), no process. The next load removes it and builds."""
    script, build_dir = tiny
    build_dir.mkdir()
    baton = FileBaton(str(build_dir / "lock"))
    assert baton.try_acquire()
    os.close(baton.fd)  # the process is gone; only the file stays
    (run,) = run_together([script], timeout_s=120)
    res = run.result()
    assert res == {"compiled": True, "answer": 42}
    assert "left by a C++ extension build that was killed" in run.stderr
    assert not (build_dir / "lock").exists()


def test_concurrent_first_loads_build_once(tiny):
    """Two processes load into one empty directory at once: both load a working library, and
    the build lock makes the second find the first's build up to date instead of racing it."""
    script, build_dir = tiny
    runs = run_together([script, script], timeout_s=180)
    results = [r.result() for r in runs]
    assert [r["answer"] for r in results] == [42, 42]
    assert sorted(r["compiled"] for r in results) == [False, True]
    assert not (build_dir / "lock").exists()


def test_wait_for_a_live_builder_is_bounded_and_logged(tmp_path, caplog):
    with cpp_build.build_lock(tmp_path):
        with caplog.at_level("INFO", logger=cpp_build.__name__):
            with pytest.raises(TimeoutError, match=f"still held by pid {os.getpid()} after"):
                with cpp_build.build_lock(tmp_path, wait_s=0.5):
                    pass
    waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1 and f"pid {os.getpid()}" in waiting[0] and str(tmp_path / "build.flock") in waiting[0]
    with cpp_build.build_lock(tmp_path, wait_s=0.5):  # released with its holder's exit from the block
        pass


def test_lock_of_a_killed_holder_is_released(tmp_path):
    """The build lock is an flock: the kernel drops it when its holder dies, even by SIGKILL."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from kernels import cpp_build\n"
                               f"with cpp_build.build_lock(Path({str(tmp_path)!r})):\n"
                               "    print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError):  # held while its holder lives
            with cpp_build.build_lock(tmp_path, wait_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with cpp_build.build_lock(tmp_path, wait_s=10):
        pass
