"""Which adapters this server can serve: name -> directory, validated against the base model.

Registration runs every header-level check (`inspect_peft_adapter`), so a corrupt,
pickled, wrong-shape or over-rank adapter is refused up front with a clear reason;
only NaN/Inf in the tensor data waits for the real load. Safe to use from any thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from server.model.arch import ModelArch

from .errors import EXISTS, NOT_FOUND, AdapterError
from .peft_format import DEFAULT_MAX_BYTES, AdapterSummary, inspect_peft_adapter
from .safe_files import AdapterDir, locate
from .store_layout import scan_adapter_store, validate_adapter_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    summary: AdapterSummary
    source: str  # "store" (found in --adapters-dir) | "cli" (--lora-modules) | "admin" (loaded over HTTP)
    pinned: bool = False  # pinned adapters stay in the host cache

    @property
    def name(self) -> str:
        return self.summary.name


class AdapterRegistry:
    def __init__(self, arch: ModelArch, max_rank: int, allowed_roots: list[Path],
                 max_bytes: int = DEFAULT_MAX_BYTES, *, reserved_names: Iterable[str] = ()):
        """`allowed_roots`: directories admin-registered adapters must live under.
        `reserved_names`: ids no adapter may take (the base model's served name)."""
        self.arch = arch
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.allowed_roots = [p.resolve() for p in allowed_roots]
        self.reserved_names = frozenset(reserved_names)
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()

    def inspect(self, name: str, where: AdapterDir) -> AdapterSummary:
        return inspect_peft_adapter(where, self.arch, name=name, max_rank=self.max_rank, max_bytes=self.max_bytes)

    def check_allowed(self, path: Path | str) -> AdapterDir:
        """Where `path` lies under an allowed root (symlinks and `..` resolved first); else AdapterError."""
        return locate(path, self.allowed_roots)

    def check_name(self, name: str, *, replace: bool = False) -> str:
        """`name` if it may name an adapter: a valid id, not reserved, not taken (unless `replace`);
        else AdapterError. Cheap: run it before reading any file."""
        validate_adapter_name(name)
        if name in self.reserved_names:
            raise AdapterError(EXISTS, f"{name!r} is the base model's name; choose another adapter id")
        if not replace and name in self:
            raise AdapterError(EXISTS, f"an adapter named {name!r} is already registered")
        return name

    def add(self, name: str, path: Path | str | AdapterDir, source: str, *, replace: bool = False) -> AdapterEntry:
        """Register `name` -> `path`. "admin" paths must lie under an allowed root; "cli" paths
        (named by the operator) are their own root; "store" passes the AdapterDir it found."""
        self.check_name(name, replace=replace)
        if isinstance(path, AdapterDir):
            where = path
        else:
            where = self.check_allowed(path) if source == "admin" else AdapterDir.own_root(path)
        entry = AdapterEntry(self.inspect(name, where), source)
        with self._lock:
            if name in self._entries and not replace:
                raise AdapterError(EXISTS, f"an adapter named {name!r} is already registered")
            self._entries[name] = entry
        return entry

    def scan_store(self, root: Path) -> list[AdapterError]:
        """Register every valid adapter under `root`; return (and log) the refused ones."""
        refused = []
        real_root = Path(root).resolve()
        for name, path in scan_adapter_store(Path(root)).items():
            try:
                self.add(name, AdapterDir(real_root, path.relative_to(real_root).parts), "store", replace=True)
            except AdapterError as exc:
                log.warning("not serving adapter %r: %s", name, exc.detail)
                refused.append(exc)
        return refused

    def remove(self, name: str) -> AdapterEntry:
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterError(NOT_FOUND, f"no adapter named {name!r}")
        return entry

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterError(NOT_FOUND, f"no adapter named {name!r}")
            entry = AdapterEntry(entry.summary, entry.source, pinned)
            self._entries[name] = entry
        return entry

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)
