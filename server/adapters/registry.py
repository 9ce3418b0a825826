"""Which adapters this server can serve: (owner, name) -> the current version, validated.

An adapter is shared (owner None) or owned by one tenant; names are per owner. Name
resolution for a tenant: its own adapter of that name first, then the shared one (an own
adapter shadows a shared one of the same name, for that tenant only); another tenant's
adapters are invisible. Every registration is a new *version* (`AdapterRef`); an
unregistered version stays known here (draining) until the manager retires it, so
requests that hold it keep their weights. Registration runs every header-level check
(`inspect_peft_adapter`), unless the caller parsed the adapter already and passes its
summary; the startup store scan reads nothing but the directory listing (`listed_summary`),
so start-up cost does not grow with adapters never used: each is validated in full by its
first load, and a bad one fails only its own requests. Safe to use from any thread.

Every change of a live entry is journalled with a generation number, so a replica (the server
process's, when the engine core runs apart) catches up with `changes_since` at the cost of what
changed, not of what is registered.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from server.model.arch import ModelArch

from .errors import EXISTS, NOT_FOUND, AdapterError
from .peft_format import DEFAULT_MAX_BYTES, AdapterSummary, inspect_peft_adapter, listed_summary
from .safe_files import AdapterDir, locate
from .store import AdapterStore
from .store_layout import validate_adapter_name

log = logging.getLogger(__name__)

Key = tuple[str | None, str]  # (owner tenant or None = shared, adapter name)


@dataclass(frozen=True)
class AdapterRef:
    """One registered version of an adapter: what a request holds while it runs."""

    owner: str | None
    name: str
    version: int

    @property
    def key(self) -> Key:
        return (self.owner, self.name)

    def __str__(self) -> str:  # for logs and metric labels: never a path
        return self.name if self.owner is None else f"{self.owner}/{self.name}"


@dataclass(frozen=True)
class AdapterEntry:
    ref: AdapterRef
    summary: AdapterSummary
    source: str  # "store" (found in the store) | "cli" (--lora-modules) | "admin" (loaded by path) | "upload"
    pinned: bool = False  # pinned adapters stay in the host cache

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def owner(self) -> str | None:
        return self.ref.owner


@dataclass
class RegistryChanges:
    """What changed in the live set after a generation: entries added or replaced (a new version,
    a learned summary, a pin), names removed; `full`: `entries` is the whole live set (the caller's
    generation was older than the journal keeps) and anything not in it is gone."""

    generation: int
    full: bool
    entries: list[AdapterEntry] = field(default_factory=list)
    removed: list[Key] = field(default_factory=list)


def listing_order(entries: Iterable[AdapterEntry]) -> list[AdapterEntry]:
    """The admin listing's order: shared adapters first, then by owner, then by name."""
    return sorted(entries, key=lambda e: (e.owner or "", e.name))


# Removals the journal remembers beyond the live set's size, before the oldest are forgotten (a
# replica older than them then gets the whole set again).
_REMOVALS_KEPT = 1024


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
        self._live: dict[Key, AdapterEntry] = {}
        self._versions: dict[AdapterRef, AdapterEntry] = {}  # live and draining
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._generation = 0
        self._journal: OrderedDict[Key, int] = OrderedDict()  # key -> generation of its last change, oldest first
        self._horizon = 0  # changes up to here may be missing from the journal (forgotten removals)

    def inspect(self, name: str, where: AdapterDir) -> AdapterSummary:
        return inspect_peft_adapter(where, self.arch, name=name, max_rank=self.max_rank, max_bytes=self.max_bytes)

    def check_allowed(self, path: Path | str) -> AdapterDir:
        """Where `path` lies under an allowed root (symlinks and `..` resolved first); else AdapterError."""
        return locate(path, self.allowed_roots)

    def check_name(self, owner: str | None, name: str, *, replace: bool = False) -> str:
        """`name` if it may name an adapter of `owner`: a valid id, not reserved, not taken
        (unless `replace`); else AdapterError. Cheap: run it before reading any file."""
        validate_adapter_name(name)
        if name in self.reserved_names:
            raise AdapterError(EXISTS, f"{name!r} is the base model's name; choose another adapter id")
        if not replace and (owner, name) in self:
            raise AdapterError(EXISTS, f"an adapter named {name!r} is already registered")
        return name

    def add(self, owner: str | None, name: str, where: Path | str | AdapterDir, source: str, *,
            summary: AdapterSummary | None = None, replace: bool = False, pinned: bool = False) -> AdapterEntry:
        """Register a new version of (owner, name). "admin" paths must lie under an allowed root;
        "cli" paths (named by the operator) are their own root; others pass the AdapterDir."""
        self.check_name(owner, name, replace=replace)
        if not isinstance(where, AdapterDir):
            where = self.check_allowed(where) if source == "admin" else AdapterDir.own_root(where)
        summary = summary or self.inspect(name, where)
        with self._lock:
            if (owner, name) in self._live and not replace:
                raise AdapterError(EXISTS, f"an adapter named {name!r} is already registered")
            entry = AdapterEntry(AdapterRef(owner, name, next(self._counter)), summary, source, pinned)
            self._live[(owner, name)] = entry
            self._versions[entry.ref] = entry
            self._changed((owner, name))
        return entry

    def scan_store(self, store: AdapterStore) -> list[AdapterError]:
        """Register every adapter directory of `store` with its owner, lazily (nothing parsed: see the
        module docstring); return (and log) the refused ones (reserved names)."""
        refused = []
        for stored in store.scan():
            try:
                self.add(stored.owner, stored.name, stored.where, "store", replace=True,
                         summary=listed_summary(stored.where, stored.name))
            except AdapterError as exc:
                log.warning("not serving adapter %r: %s", stored.name, exc.detail)
                refused.append(exc)
        return refused

    def remove(self, owner: str | None, name: str) -> AdapterEntry:
        """Stop serving (owner, name) to new requests; its version stays known until `retire`."""
        with self._lock:
            entry = self._live.pop((owner, name), None)
            if entry is not None:
                self._changed((owner, name))
        if entry is None:
            raise AdapterError(NOT_FOUND, f"no adapter named {name!r}")
        return entry

    def retire(self, ref: AdapterRef) -> None:
        """Forget a version nothing uses any more."""
        with self._lock:
            if self._live.get(ref.key, None) is None or self._live[ref.key].ref != ref:
                self._versions.pop(ref, None)

    def move(self, ref: AdapterRef, where: AdapterDir) -> None:
        """A draining version's files moved (to the store's trash): loads read them there."""
        with self._lock:
            entry = self._versions.get(ref)
            if entry is not None:
                self._versions[ref] = replace(entry, summary=replace(entry.summary, where=where))

    def record_summary(self, ref: AdapterRef, summary: AdapterSummary) -> None:
        """A load parsed `ref` in full: its listing shows rank, modules and size from now on."""
        with self._lock:
            entry = self._versions.get(ref)
            if entry is None or entry.summary.inspected:
                return
            entry = replace(entry, summary=replace(summary, where=entry.summary.where))
            self._versions[ref] = entry
            if self._live.get(ref.key) is not None and self._live[ref.key].ref == ref:
                self._live[ref.key] = entry
                self._changed(ref.key)

    def set_pinned(self, owner: str | None, name: str, pinned: bool) -> AdapterEntry:
        with self._lock:
            entry = self._live.get((owner, name))
            if entry is None:
                raise AdapterError(NOT_FOUND, f"no adapter named {name!r}")
            entry = replace(entry, pinned=pinned)
            self._live[(owner, name)] = self._versions[entry.ref] = entry
            self._changed((owner, name))
        return entry

    def changes_since(self, generation: int) -> RegistryChanges:
        """The live set's changes after `generation` (0: everything), O(changes)."""
        with self._lock:
            if generation < self._horizon:
                return RegistryChanges(self._generation, True, list(self._live.values()))
            out = RegistryChanges(self._generation, False)
            for key, gen in reversed(self._journal.items()):  # newest first: stop at the first seen
                if gen <= generation:
                    break
                entry = self._live.get(key)
                if entry is None:
                    out.removed.append(key)
                else:
                    out.entries.append(entry)
            return out

    def _changed(self, key: Key) -> None:
        """Journal a change of `key` (under the lock)."""
        self._generation += 1
        self._journal[key] = self._generation
        self._journal.move_to_end(key)
        if len(self._journal) > len(self._live) + 2 * _REMOVALS_KEPT:
            removed = [(k, g) for k, g in self._journal.items() if k not in self._live]
            for k, g in removed[:len(removed) - _REMOVALS_KEPT]:  # the oldest
                del self._journal[k]
                self._horizon = max(self._horizon, g)

    def lookup(self, tenant: str | None, name: str) -> AdapterEntry | None:
        """What `name` means to `tenant` (None: the shared set only): its own, else the shared one."""
        with self._lock:
            own = self._live.get((tenant, name)) if tenant is not None else None
            return own or self._live.get((None, name))

    def get(self, owner: str | None, name: str) -> AdapterEntry | None:
        """The live version of exactly (owner, name)."""
        with self._lock:
            return self._live.get((owner, name))

    def version(self, ref: AdapterRef) -> AdapterEntry | None:
        """A live or draining version."""
        with self._lock:
            return self._versions.get(ref)

    def is_live(self, ref: AdapterRef) -> bool:
        with self._lock:
            entry = self._live.get(ref.key)
            return entry is not None and entry.ref == ref

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._live

    def visible(self, tenant: str | None) -> list[AdapterEntry]:
        """The adapters `tenant` may use, by name: its own, then shared ones it does not shadow."""
        with self._lock:
            own = {n: e for (o, n), e in self._live.items() if tenant is not None and o == tenant}
            shared = {n: e for (o, n), e in self._live.items() if o is None and n not in own}
        return sorted([*own.values(), *shared.values()], key=lambda e: (e.owner is None, e.name))

    def entries(self) -> list[AdapterEntry]:
        """Every live adapter of every owner (shared first)."""
        with self._lock:
            return listing_order(self._live.values())

    def owned(self, tenant: str) -> list[AdapterEntry]:
        with self._lock:
            return [e for (o, _), e in self._live.items() if o == tenant]
