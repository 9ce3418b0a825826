"""The host tier: parsed adapters in memory, an LRU under a count and a bytes budget.

Loads (read + parse + validate, milliseconds to seconds) run on worker threads (`loaders`
of them) so the engine keeps stepping; a finished load is handed back through a queue and becomes
resident at the engine's next `poll()`. The LRU itself is touched only by the engine
thread. Loads start only when the scheduler asks (`prefetch`, for the requests about to be
admitted), never for a whole queue. Adapters the scheduler keeps (running or in its prefetch
window) and pinned ones are never evicted; if everything is kept the budget is exceeded
rather than failing requests. Each load also computes what is derived from the weights
(`prepare`: the manager's DoRA rescale against the base weights) on the loader thread.

`in_place`: the loader thread also writes each adapter it loads into the device pool
(LoraSlots.write_in_place: a copy on the loader thread on CPU, an overlapped host -> device copy
on a GPU), so a
step activates it without a copy; an adapter this cache evicts or drops leaves the pool with it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.metrics import Metrics

from .errors import INVALID, NOT_FOUND, AdapterError
from .lora_weights import LoraAdapter
from .peft_format import parse_peft_adapter
from .registry import AdapterRef, AdapterRegistry
from .slots import LoraSlots

log = logging.getLogger(__name__)


@dataclass
class _Done:
    ref: AdapterRef
    adapter: LoraAdapter | None
    error: AdapterError | None
    seconds: float


class HostAdapterCache:
    def __init__(self, registry: AdapterRegistry, max_adapters: int, max_bytes: int, metrics: Metrics,
                 on_loaded: Callable[[], None] | None = None,
                 prepare: Callable[[LoraAdapter], LoraAdapter] | None = None, in_place: LoraSlots | None = None,
                 loaders: int = 1):
        """`prepare`: run on each parsed adapter before it becomes resident (may raise AdapterError).
        `in_place`: the device pool that loads are written into as they finish. `loaders`: loads
        that run at once (worker threads)."""
        self.registry = registry
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.on_loaded = on_loaded  # wakes the engine loop when a load finishes
        self.prepare = prepare
        self.in_place = in_place
        self._resident: OrderedDict[AdapterRef, LoraAdapter] = OrderedDict()
        self._loading: set[AdapterRef] = set()
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="adapter-load")

    # --- engine thread ---------------------------------------------------------------------
    def touch(self, ref: AdapterRef) -> bool:
        """A request for `ref` arrived: count a hit (resident: also most recently used) or a miss."""
        if ref in self._resident:
            self._resident.move_to_end(ref)
            self.metrics.adapter_cache_hits.inc()
            return True
        self.metrics.adapter_cache_misses.inc()
        return False

    def prefetch(self, refs: Iterable[AdapterRef], keep: set[AdapterRef]) -> list[AdapterRef]:
        """Start loads for the non-resident `refs`, in order, while the count and bytes budgets have
        room beside the kept adapters (resident ones not in `keep` are evictable, so they count as room).
        So a prefetch never pushes out an adapter that is kept. One load may always be in flight,
        even over budget, so the most wanted adapter is never stuck behind kept ones. Returns the
        loads started."""
        started = []
        held = [r for r in self._resident if r in keep or self._pinned(r)]  # not evictable
        if self.in_place is not None:
            self.in_place.protect(keep)
        room = self.max_adapters - len(self._loading) - len(held)
        room_bytes = (self.max_bytes - sum(self._resident[r].nbytes for r in held)
                      - sum(self._estimate(r) for r in self._loading))
        for ref in refs:
            if ref in self._resident or ref in self._loading:
                continue
            need = self._estimate(ref)
            if (room <= 0 or need > room_bytes) and self._loading:
                break
            self._loading.add(ref)
            self._pool.submit(self._load, ref)
            started.append(ref)
            room -= 1
            room_bytes -= need
        return started

    def _estimate(self, ref: AdapterRef) -> int:
        """Bytes `ref` will take once loaded (fp32): exact if it was parsed before, else twice its
        file (an upper bound for 16-bit files, the usual kind)."""
        entry = self.registry.version(ref)
        if entry is None:
            return 0
        s = entry.summary
        return s.num_params * 4 if s.num_params is not None else 2 * s.file_bytes

    def _pinned(self, ref: AdapterRef) -> bool:
        entry = self.registry.version(ref)
        return entry is not None and entry.pinned

    def is_resident(self, ref: AdapterRef) -> bool:
        return ref in self._resident

    def resident(self) -> list[AdapterRef]:
        """The adapters in the cache now (any thread: one C-level copy of the keys, atomic
        under the GIL, while the engine thread may be changing the LRU)."""
        return list(self._resident)

    def rank_of(self, ref: AdapterRef) -> int | None:
        """The rank of `ref` if it is in the cache (its LRU place unchanged), else None."""
        adapter = self._resident.get(ref)
        return None if adapter is None else adapter.rank

    def is_loading(self, ref: AdapterRef) -> bool:
        return ref in self._loading

    def get(self, ref: AdapterRef) -> LoraAdapter:
        adapter = self._resident[ref]
        self._resident.move_to_end(ref)
        return adapter

    def poll(self, in_use: Callable[[], Iterable[AdapterRef]]) -> dict[AdapterRef, AdapterError]:
        """Make finished loads resident, enforce the budget; returns the failed loads."""
        failed: dict[AdapterRef, AdapterError] = {}
        changed = False
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                break
            self._loading.discard(done.ref)
            if done.adapter is None:
                if done.ref in self._resident:  # a second read of a version already here (an admin load's
                    continue                    # hand-over raced a prefetch): its requests have their weights
                failed[done.ref] = done.error
                continue
            if self.registry.version(done.ref) is None:  # retired while it loaded
                if self.in_place is not None:
                    self.in_place.evict(done.ref)
                continue
            self._resident[done.ref] = done.adapter
            self._resident.move_to_end(done.ref)
            changed = True
        if changed:
            self._evict(set(in_use()))
        self._publish()
        return failed

    def drop(self, ref: AdapterRef) -> None:
        """Forget `ref` (retired: nothing uses it any more)."""
        self._resident.pop(ref, None)
        if self.in_place is not None:
            self.in_place.evict(ref)
        self._publish()  # an unload on an idle engine: no poll follows to update the gauge

    def _publish(self) -> None:
        self.metrics.adapters_resident.labels("host").set(len(self._resident))

    def offer(self, ref: AdapterRef, adapter: LoraAdapter, seconds: float = 0.0) -> None:
        """Any thread: hand over an adapter loaded (and prepared) elsewhere (admin loads); resident at
        the next poll."""
        if self.in_place is not None:
            self.in_place.write_in_place(ref, adapter)
        self._done.put(_Done(ref, adapter, None, seconds))

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _evict(self, in_use: set[AdapterRef]) -> None:
        def over() -> bool:
            return len(self._resident) > self.max_adapters or self.resident_bytes > self.max_bytes

        for ref in list(self._resident):  # least recently used first
            if not over():
                return
            if ref in in_use or self._pinned(ref):
                continue
            del self._resident[ref]
            if self.in_place is not None:
                self.in_place.evict(ref)
            self.metrics.adapter_evictions.labels("host").inc()
        if over():
            log.warning("host adapter cache over budget: %d adapters / %d bytes are all in use or pinned",
                        len(self._resident), self.resident_bytes)

    # --- loader thread -----------------------------------------------------------------------
    def _load(self, ref: AdapterRef) -> None:
        t0 = time.perf_counter()
        adapter, error = None, None
        try:
            entry = self.registry.version(ref)
            if entry is None:
                raise AdapterError(NOT_FOUND, f"no adapter named {ref.name!r}")
            r = self.registry
            # Re-opened through safe_files: the files are re-checked (no symlinks, inside the root) now.
            summary, parsed = parse_peft_adapter(entry.summary.where, r.arch, name=ref.name, max_rank=r.max_rank,
                                                 max_bytes=r.max_bytes)
            if entry.summary.files_id is not None and summary.files_id != entry.summary.files_id:
                # Requests and the prefix cache know this version by its first files: new ones under
                # the same version would mix the two (cached blocks from the old weights).
                raise AdapterError(INVALID, "its files changed on disk since this version was loaded; register it "
                                   "again to serve them (unload and load it, or restart the server)")
            r.record_summary(ref, summary)  # a lazily registered adapter is now fully known
            adapter = self.prepare(parsed) if self.prepare is not None else parsed
            if self.in_place is not None:
                self.in_place.write_in_place(ref, adapter)  # no room: activation copies it later
        except AdapterError as exc:
            log.warning("loading adapter %s failed: %s", ref, exc.detail)
            error = exc
        except Exception:  # an unreadable file must fail its requests, not the loader
            log.exception("loading adapter %s failed", ref)
            error = AdapterError(INVALID, "the adapter could not be loaded (see the server log)")
        seconds = time.perf_counter() - t0
        self.metrics.adapter_loads.labels("ok" if error is None else "error").inc()
        self.metrics.adapter_load_seconds.observe(seconds)
        self._done.put(_Done(ref, adapter, error, seconds))
        if self.on_loaded is not None:
            self.on_loaded()
