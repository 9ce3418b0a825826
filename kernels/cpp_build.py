"""JIT build-and-load of a C++ op library that survives killed builds and concurrent first starts.

torch.utils.cpp_extension.load guards its build directory with a FileBaton: a `lock` file
created with O_CREAT|O_EXCL and deleted when the build ends; any other loader polls until the
file is gone. A builder killed mid-build (a server stopped during its first start, a CI job
timed out) never deletes it, so every later load waited forever, silently.

Here every load first takes an flock on `<build_dir>/build.flock`. The kernel drops an flock
when its holder exits, however it exits, so once we hold it no live loader of ours can be
inside torch's build: a `lock` file found then was left by a dead builder and is removed.
Concurrent loads (two servers, pytest-xdist workers) queue on the flock: the first builds, the
next find the build up to date (ninja compares timestamps and command lines, so a killed
half-build is redone) and only load it. The wait for a live builder is bounded (`wait_s`), and
logged with the holder's pid and the lock's path.

Limit: a process that calls cpp_extension.load on the same directory without this module (an
older loramux) does not take the flock, so its live `lock` would be taken for a stale one: a
directory built this way needs a name no such loader uses (paged_attention's layout suffix).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_WAIT_S = 600.0  # a first build takes 10-60 s; past this the holder is taken to be hung
_LOG_EVERY_S = 30.0
_POLL_S = 0.2
FLOCK_NAME = "build.flock"
BATON_NAME = "lock"  # torch's FileBaton file in the build directory


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(fd: int) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {pid}" if pid else "a process that has not written its pid yet"


@contextmanager
def build_lock(build_dir: Path, wait_s: float = BUILD_WAIT_S) -> Iterator[None]:
    """Hold the exclusive build lock of `build_dir` (created if missing); wait at most `wait_s`
    seconds for another holder, logging what is waited for, then raise TimeoutError."""
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / FLOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd):
            t0 = time.monotonic()
            log.info("waiting up to %.0f s for %s to finish building the C++ extension in %s (lock %s)",
                     wait_s, _holder(fd), build_dir, path)
            next_log = t0 + _LOG_EVERY_S
            while not _try_flock(fd):
                now = time.monotonic()
                if now - t0 > wait_s:
                    raise TimeoutError(f"C++ extension build lock {path} still held by {_holder(fd)} "
                                       f"after {wait_s:.0f} s")
                if now >= next_log:
                    log.warning("still waiting (%.0f s) for %s, lock %s", now - t0, _holder(fd), path)
                    next_log = now + _LOG_EVERY_S
                time.sleep(_POLL_S)
            log.info("C++ extension build lock %s acquired after %.1f s", path, time.monotonic() - t0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the PyPI `ninja` package installs it next to the
    interpreter, which is not on PATH when a venv's python is run without activating it."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def load_library(name: str, sources: list[str], build_dir: Path, cflags: list[str], ldflags: list[str],
                 wait_s: float = BUILD_WAIT_S) -> tuple[str, bool]:
    """Build `sources` into `build_dir/<name>.so` if out of date, and load it (torch.ops.load_library:
    the library registers its ops with TORCH_LIBRARY). Returns (the library's path, whether it
    was compiled now rather than found up to date). Raises what the build raises, and
    TimeoutError if another live builder holds the directory for more than `wait_s` seconds."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    with build_lock(build_dir, wait_s):
        baton = build_dir / BATON_NAME
        if baton.exists():
            log.warning("removing %s, left by a C++ extension build that was killed; rebuilding what it left "
                        "unfinished", baton)
            baton.unlink(missing_ok=True)
        before = {p: p.stat().st_mtime_ns for p in build_dir.glob("*.so")}
        lib = Path(cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                                      build_directory=str(build_dir), is_python_module=False, verbose=False))
        return str(lib), before.get(lib) != lib.stat().st_mtime_ns
