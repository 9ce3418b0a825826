"""The adapter manager as the server process sees it when the engine runs in its own process.

The `AdapterManager` (registry, host cache, device slots) lives in the engine core, where
requests acquire versions and steps activate them. The server process keeps a read replica of
the registry (the live entries and their residency) so that what every request needs, a
name -> version lookup and the checks of validation, costs no round trip. Registration
(admin load, upload, pin, unregister) is a named call to the core, after which the replica is
refreshed before the call returns, so the next request sees it. Listings refresh it first
(one round trip, not on the generation path), and it is refreshed once a second otherwise (a
first load learns an adapter's rank and DoRA flag, residency changes); a request checked against
a stale replica is checked again by the core at admission, where a refusal is still an HTTP
status. A refresh carries what changed since the replica's generation and the resident set,
so its cost does not grow with the adapters registered.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from server.adapters.registry import AdapterEntry, AdapterRef, Key, listing_order

if TYPE_CHECKING:
    from server.engine.core_client import ProcessEngine
    from server.engine.core_process import RegistrySnapshot


class RemoteAdapters:
    """The `AdapterManager` methods the HTTP routes use, over a replica of the core's registry."""

    is_replica = True  # what it says of an adapter's files may lag the core's by up to a refresh

    def __init__(self, client: ProcessEngine, snapshot: RegistrySnapshot, step_capacity: int):
        self._client = client
        self.step_capacity = step_capacity
        self._live: dict[Key, AdapterEntry] = {}
        self._generation = 0
        self._resident: dict[AdapterRef, tuple[bool, bool]] = {}
        self._apply_lock = threading.Lock()  # refreshes come from the event loop and worker threads
        self.apply(snapshot)

    def apply(self, snapshot: RegistrySnapshot) -> None:
        changes = snapshot.changes
        with self._apply_lock:
            # An answer older than the replica (overtaken by a newer one) changes nothing.
            if changes.generation > self._generation or (changes.full and changes.generation == self._generation):
                # A new dict swapped in whole (readers take no lock): a reader on another thread
                # sees the old or the new one.
                live = {} if changes.full else dict(self._live)
                for key in changes.removed:
                    live.pop(key, None)
                live.update((e.ref.key, e) for e in changes.entries)
                self._live, self._generation = live, changes.generation
            self._resident = snapshot.resident

    def refresh(self) -> None:
        """From a worker thread: catch up with the core."""
        self.apply(self._client.call_sync("snapshot", self._generation))

    async def refresh_async(self) -> None:
        self.apply(await self._client.call("snapshot", self._generation))

    # --- lookups (any thread, no round trip) ------------------------------------------------
    def lookup(self, tenant: str | None, name: str) -> AdapterRef | None:
        live = self._live
        entry = (live.get((tenant, name)) if tenant is not None else None) or live.get((None, name))
        return entry.ref if entry else None

    def get(self, owner: str | None, name: str) -> AdapterEntry | None:
        return self._live.get((owner, name))

    def visible(self, tenant: str | None) -> list[AdapterEntry]:
        live = self._live
        own = {n: e for (o, n), e in live.items() if tenant is not None and o == tenant}
        shared = {n: e for (o, n), e in live.items() if o is None and n not in own}
        return sorted([*own.values(), *shared.values()], key=lambda e: (e.owner is None, e.name))

    def entries(self) -> list[AdapterEntry]:
        return listing_order(self._live.values())

    def exists(self, adapter: AdapterRef | str) -> bool:
        key = adapter.key if isinstance(adapter, AdapterRef) else (None, adapter)
        return key in self._live

    def is_dora(self, ref: AdapterRef) -> bool:
        entry = self._live.get(ref.key)
        return entry is not None and entry.ref == ref and bool(entry.summary.use_dora)

    def residency(self, ref: AdapterRef) -> tuple[bool, bool]:
        return self._resident.get(ref, (False, False))

    # --- registration: calls to the core (worker threads; blocking) ------------------------------
    def load_path(self, owner: str | None, name: str, path: str, *, pinned: bool = False) -> AdapterEntry:
        return self._registering("load_path", owner, name, path, pinned=pinned)

    def upload(self, owner: str | None, name: str, files: dict[str, bytes], *,
               max_adapters: int | None = None, max_bytes: int | None = None) -> AdapterEntry:
        return self._registering("upload", owner, name, files, max_adapters=max_adapters, max_bytes=max_bytes)

    def set_pinned(self, owner: str | None, name: str, pinned: bool) -> AdapterEntry:
        return self._registering("set_pinned", owner, name, pinned)

    def _registering(self, method: str, *args, **kwargs) -> AdapterEntry:
        try:
            return self._client.call_sync(method, *args, **kwargs)
        finally:  # refused or not, the replica is current before the route answers
            self.refresh()
