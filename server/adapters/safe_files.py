"""The one place that decides which adapter files may be read, and reads them.

Policy: an adapter directory lies under an allowed root (its real path, after
resolving any symlinks the name goes through); its files are regular files directly
inside it, never symlinks. Every read goes through a file descriptor reached by
walking from the root's descriptor one component at a time with O_NOFOLLOW, so a
symlink swapped in after the check cannot redirect a read (no check-then-open race),
and FIFOs/devices are refused before they are opened (a read could block forever).

Messages never carry bytes of a file, the configured roots or absolute server
paths: `AdapterError.path` keeps the full path for the server log.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FORBIDDEN, INVALID, NOT_FOUND, AdapterError

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; longer is malformed input, not a missing file
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# O_NONBLOCK: opening a FIFO (swapped in after the stat) must not wait for a writer.
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = _FILE_FLAGS | getattr(os, "O_DIRECTORY", 0)
_PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class AdapterDir:
    """Where an adapter lives: `root` (resolved, trusted: configured by the operator) / `parts`."""

    root: Path
    parts: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        """The full path, for server logs only (never shown to clients)."""
        return self.root.joinpath(*self.parts)

    @property
    def label(self) -> str:
        """The adapter's place relative to its root: safe to show an admin."""
        return "/".join(self.parts) or self.root.name

    @classmethod
    def own_root(cls, path: Path | str) -> AdapterDir:
        """A directory the operator named explicitly (--lora-modules, direct API use): its own root."""
        return cls(_resolve(_checked_text(path), shown="adapter path"))


def check_path_text(path: object) -> str:
    """`path` as a string if it is well-formed (non-empty, no NUL, at most MAX_PATH_CHARS); else adapter_invalid."""
    return _checked_text(path)


def locate(path: Path | str, roots: list[Path]) -> AdapterDir:
    """The adapter directory `path` names, if its real path lies under one of `roots` (resolved).

    adapter_invalid: malformed path or symlink loop; adapter_forbidden: outside every root
    (checked before existence, so paths outside cannot be probed); adapter_not_found.
    """
    text = _checked_text(path)
    try:
        real = Path(os.path.abspath(text)).resolve()  # follows the symlinks that exist
    except (OSError, RuntimeError, ValueError):  # loops: RuntimeError before 3.13, OSError after
        raise AdapterError(INVALID, "lora_path cannot be resolved (a symlink loop or an unreadable "
                           "component)", path=text) from None
    for root in roots:
        if real == root or root in real.parents:
            return AdapterDir(root, real.relative_to(root).parts)
    raise AdapterError(FORBIDDEN, "lora_path is not under an allowed adapter root", path=real, shown="")


class OpenAdapterDir:
    """An adapter directory opened for reading; use as a context manager (closes every descriptor)."""

    def __init__(self, where: AdapterDir):
        self.where = where
        self._fds: list[int] = []
        self.opened: dict[str, int] = {}  # file name -> its descriptor, for what was read
        self.fd = self._walk()

    def __enter__(self) -> OpenAdapterDir:
        return self

    def __exit__(self, *exc) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def names(self) -> list[str]:
        """Entry names directly inside the directory."""
        try:
            return os.listdir(self.fd)
        except OSError as exc:
            raise AdapterError(INVALID, f"cannot list the adapter directory ({_why(exc)})",
                               path=self.where.path) from None

    def open_file(self, name: str) -> int | None:
        """A read-only descriptor of regular file `name` in the directory; None if there is none.

        adapter_invalid if `name` is a symlink, a FIFO, a device or a directory."""
        file_path = self.where.path / name
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AdapterError(INVALID, f"cannot read ({_why(exc)})", path=file_path) from None
        if stat.S_ISLNK(st.st_mode):
            raise AdapterError(INVALID, "is a symbolic link; adapter files must be regular files (copy the "
                               "adapter, e.g. with cp -L, instead of linking it)", path=file_path)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(INVALID, "is not a regular file", path=file_path)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as exc:  # ELOOP: swapped for a symlink since the stat
            raise AdapterError(INVALID, f"cannot read ({_why(exc)})", path=file_path) from None
        self._fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO/device since the stat
            raise AdapterError(INVALID, "is not a regular file", path=file_path)
        self.opened[name] = fd
        return fd

    def identity(self) -> tuple[int, ...]:
        """What tells the files opened so far apart from any later content under their names:
        (device, inode, size, mtime in ns) of each, by name."""
        out: list[int] = []
        for name in sorted(self.opened):
            st = os.fstat(self.opened[name])
            out += [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        return tuple(out)

    def _walk(self) -> int:
        where = self.where
        try:
            fd = os.open(where.root, _DIR_FLAGS & ~_NOFOLLOW)  # the root itself is the operator's choice
        except OSError as exc:
            raise _dir_error(exc, where.root) from None
        self._fds.append(fd)
        for part in where.parts:
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                self.__exit__()
                raise _dir_error(exc, where.path) from None
            self._fds.append(fd)
        return fd


def read_limited(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from the current position of `fd` (fewer only at end of file)."""
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def fd_path(fd: int) -> str | None:
    """A path that reopens exactly the file behind `fd` (Linux /proc), for libraries that take a path."""
    return f"{_PROC_FD}/{fd}" if _PROC_FD.is_dir() else None


def _dir_error(exc: OSError, path: Path) -> AdapterError:
    if exc.errno == errno.ENOENT:
        return AdapterError(NOT_FOUND, "no such adapter directory", path=path)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a component is (now) a symlink or a file
        return AdapterError(INVALID, "not an adapter directory (not a directory, or a symlink was swapped in)",
                            path=path)
    return AdapterError(INVALID, f"cannot open the adapter directory ({_why(exc)})", path=path)


def _checked_text(path: object) -> str:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise AdapterError(INVALID, "the adapter path must be a non-empty string")
    if "\0" in text:
        raise AdapterError(INVALID, "the adapter path contains a NUL character")
    if len(text) > MAX_PATH_CHARS:
        raise AdapterError(INVALID, f"the adapter path is longer than {MAX_PATH_CHARS} characters")
    return text


def _resolve(text: str, *, shown: str) -> Path:
    try:
        return Path(text).resolve(strict=True)
    except FileNotFoundError:
        raise AdapterError(NOT_FOUND, "no such adapter directory", path=text) from None
    except (OSError, RuntimeError, ValueError):
        raise AdapterError(INVALID, f"{shown} cannot be resolved (a symlink loop or an unreadable component)",
                           path=text) from None


def _why(exc: OSError) -> str:
    # strerror only ("Permission denied"): str(exc) would carry the path.
    return exc.strerror or type(exc).__name__
