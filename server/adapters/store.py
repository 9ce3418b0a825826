"""Writes to the adapter store (layout: store_layout.py): uploads land atomically, deletes drain.

An upload is written into a hidden temp directory (files fsynced), validated there, and
renamed into place (then the parent fsynced): a crash leaves a temp directory that the next
start removes, never a half adapter under a servable name. A deleted adapter's directory is
renamed into `.trash/` at once (so its name is free again) and removed when the last request
using it has finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import EXISTS, AdapterError
from .safe_files import AdapterDir
from .store_layout import (
    CONFIG_NAME,
    TENANTS_DIR,
    TMP_PREFIX,
    TRASH_DIR,
    WEIGHTS_NAME,
    scan_adapter_store,
    scan_tenant_stores,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredAdapter:
    owner: str | None
    name: str
    where: AdapterDir


class AdapterStore:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def parts_of(self, owner: str | None, name: str) -> tuple[str, ...]:
        return (name,) if owner is None else (TENANTS_DIR, owner, name)

    def holds(self, where: AdapterDir) -> bool:
        """Whether `where` is an adapter directory this store manages (and may delete)."""
        return where.root == self.root and len(where.parts) in (1, 3) and not where.parts[0].startswith(".")

    def scan(self) -> list[StoredAdapter]:
        """Every adapter directory in the store, shared first; removes crash leftovers first."""
        self._remove_leftovers()
        found = [StoredAdapter(None, n, self._dir(p)) for n, p in scan_adapter_store(self.root).items()]
        for owner, adapters in scan_tenant_stores(self.root).items():
            found += [StoredAdapter(owner, n, self._dir(p)) for n, p in adapters.items()]
        return found

    def stage(self, files: dict[str, bytes]) -> AdapterDir:
        """Write `files` (CONFIG_NAME, WEIGHTS_NAME) into a fresh hidden directory, fsynced."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o750)
        try:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o640)
                try:
                    view = memoryview(files[name])
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return AdapterDir(self.root, (tmp.name,))

    def commit(self, staged: AdapterDir, owner: str | None, name: str) -> AdapterDir:
        """Rename a staged directory to (owner, name); EXISTS if that directory is there already."""
        parts = self.parts_of(owner, name)
        target = self.root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # rename() would replace an empty directory; mkdir-less renameat2(NOREPLACE) is not in
            # os, so check first: commits are serialized by the manager's upload lock.
            if target.exists() or target.is_symlink():
                raise AdapterError(EXISTS, f"an adapter named {name!r} is already in the store")
            os.rename(staged.path, target)
            _fsync_dir(target.parent)
        except BaseException:
            self.discard(staged)
            raise
        return AdapterDir(self.root, parts)

    def discard(self, staged: AdapterDir) -> None:
        shutil.rmtree(staged.path, ignore_errors=True)

    def take_out(self, owner: str | None, name: str, where: AdapterDir) -> AdapterDir:
        """Take (owner, name), whose files `where` holds, out of the store's namespace; returns where
        its files lie now (for a version still draining). The entry under its name goes: a directory
        to the trash, a symlink (to another adapter's directory: the store allows them) unlinked
        alone, its target untouched."""
        place = self.root.joinpath(*self.parts_of(owner, name))
        if place.is_symlink():
            place.unlink()
            _fsync_dir(place.parent)
            return where
        if place != where.path:  # not where its name says (cannot happen through this class): leave it
            log.warning("adapter store: %s is not at %s; its files are left in place", name, place)
            return where
        return self.trash(where)

    def trash(self, where: AdapterDir) -> AdapterDir:
        """Move a stored adapter out of the servable namespace; returns where it now lies."""
        trash = self.root / TRASH_DIR
        trash.mkdir(exist_ok=True)
        target = trash / uuid.uuid4().hex
        os.rename(where.path, target)
        _fsync_dir(where.path.parent)
        return AdapterDir(self.root, (TRASH_DIR, target.name))

    def remove_trashed(self, where: AdapterDir) -> None:
        if where.root == self.root and where.parts[:1] == (TRASH_DIR,):
            shutil.rmtree(where.path, ignore_errors=True)

    def _dir(self, path: Path) -> AdapterDir:
        return AdapterDir(self.root, path.relative_to(self.root).parts)

    def _remove_leftovers(self) -> None:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name.startswith(TMP_PREFIX) or entry.name == TRASH_DIR:
                log.info("adapter store: removing leftover %s", entry.name)
                shutil.rmtree(entry, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
