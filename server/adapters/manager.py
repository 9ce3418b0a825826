"""The adapter subsystem's one entry point: registry (names, owners, versions) -> host cache -> device slots.

Callers (the engine, the HTTP routes) use only this class. Threads:
  * lookups and listings: any thread;
  * registration (`load_path`, `upload`, `set_pinned`): any thread, blocking file I/O (run it
    off the event loop);
  * everything that touches resident weights or reference counts (`acquire`, `release`,
    `unregister`, `poll`, `activate`): the engine thread only.

Lifecycle: each registration is a new version (`AdapterRef`). A request holds the version
it was admitted with (`acquire` ... `release`). `unregister` stops new requests at once;
a version still held drains (its weights stay resident) and is retired (memory freed,
trashed files removed) when its last request finishes. Registering the name again while
the old version drains serves the new version to new requests only.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from server.config import LoraConfig
from server.engine.residency import AdapterState
from server.metrics import Metrics
from server.model.arch import ModelArch

from .dora import BaseWeight, with_dora_scales
from .errors import EXISTS, NO_STORE, NOT_FOUND, QUOTA, AdapterError
from .host_cache import HostAdapterCache
from .lora_weights import LoraAdapter
from .peft_format import parse_peft_adapter
from .registry import AdapterEntry, AdapterRef, AdapterRegistry, RegistryChanges
from .slots import LoraSlots
from .store import AdapterStore
from .store_layout import WEIGHTS_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepLora:
    """One step's adapters placed in the device pool: ref -> slot, and each slot's rank."""

    slot_of: dict[AdapterRef, int]
    slot_rank: list[int]
    num_slots: int
    slots: LoraSlots  # the pool the step's LoRA backend reads


POOL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # what --lora-dtype may name


def pool_dtype(lora_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The adapter pool's dtype for --lora-dtype. `auto`: float32 on CPU, the model dtype elsewhere.
    On CPU the LoRA kernels are many small GEMMs, and torch's bf16 ones run slower than fp32 even
    with AMX (bf16 slots: 0.44-0.80x the fp32 ones' throughput at 8 adapters, 0.29-0.60x at 1,000
    under Zipf; docs/benchmarks.md section 5); the host cache holds fp32 weights anyway.
    Any other name is refused at start (ValueError): an integer pool would truncate every weight."""
    if lora_dtype == "auto":
        return torch.float32 if device.type == "cpu" else model_dtype
    if lora_dtype not in POOL_DTYPES:
        raise ValueError(f"--lora-dtype: expected auto, {' or '.join(POOL_DTYPES)}, got {lora_dtype!r}")
    return POOL_DTYPES[lora_dtype]


class AdapterManager:
    is_replica = False  # the registry itself (see server/engine/remote_adapters.py for the replica)

    def __init__(self, cfg: LoraConfig, arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 metrics: Metrics, on_loaded: Callable[[], None] | None = None, *,
                 reserved_names: Iterable[str] = (), base_weight: BaseWeight | None = None,
                 page_rank: int | None = None):
        """`reserved_names`: ids no adapter may take (the base model's served name). `base_weight`:
        (layer, PEFT module) -> the base model's W [out, in] (server.model.loading.base_linear_weight);
        without it DoRA adapters fail to load. `page_rank`: the pool's page rank (the LoRA
        backend's choice; default --max-lora-rank, unpaged)."""
        self._base_weight = base_weight
        roots = [Path(cfg.adapters_dir)] if cfg.adapters_dir else []
        roots += [Path(p) for p in cfg.allowed_adapter_roots]
        self._registry = AdapterRegistry(arch, cfg.max_lora_rank, roots, reserved_names=reserved_names)
        self._store = AdapterStore(cfg.adapters_dir) if cfg.adapters_dir else None
        if self._store is not None:
            self._registry.scan_store(self._store)
        for name, path in cfg.lora_modules.items():  # named explicitly: a bad one is a startup error
            try:
                self._registry.add(None, name, path, "cli", replace=True)
            except AdapterError as exc:
                log.error("--lora-modules %s: %s", name, exc.detail)
                raise
        self._metrics = metrics
        lora_dtype = pool_dtype(cfg.lora_dtype, dtype, device)
        # The pool is filled from the host cache, so it never needs more slots than that holds.
        self._slots = LoraSlots.sized(arch, cfg.lora_pool_memory, cfg.max_lora_rank, lora_dtype, device, metrics,
                                      max_slots=max(1, cfg.max_cpu_loras), page_rank=page_rank)
        # Loads are written into the pool by the loader thread (on a GPU on a copy stream of its own,
        # overlapped with the steps): a step activates them without a copy.
        self._cache = HostAdapterCache(self._registry, cfg.max_cpu_loras, cfg.cpu_lora_cache_memory, metrics,
                                       on_loaded, prepare=self._prepare, in_place=self._slots,
                                       loaders=cfg.adapter_loaders or (1 if device.type == "cpu" else 4))
        self._step_limit = cfg.max_loras
        self._users: Counter[AdapterRef] = Counter()  # engine thread: requests holding each version
        self._upload_lock = threading.Lock()  # quota check + commit of one upload at a time
        entries = self._registry.entries()
        log.info("adapters: %d registered (%s); device pool %d slots, %d pages of rank %d (%.0f MiB), up to %d "
                 "distinct adapters of rank %d per step; host cache %d adapters", len(entries),
                 ", ".join(str(e.ref) for e in entries[:8]), self._slots.num_slots, self._slots.num_pages,
                 self._slots.page_rank, self._slots.nbytes / 2**20, self.step_capacity, cfg.max_lora_rank,
                 cfg.max_cpu_loras)

    # --- lookups (any thread) ------------------------------------------------------------------
    def lookup(self, tenant: str | None, name: str) -> AdapterRef | None:
        """The version `name` means to `tenant` now: its own adapter, else the shared one; None if neither."""
        entry = self._registry.lookup(tenant, name)
        return entry.ref if entry else None

    def get(self, owner: str | None, name: str) -> AdapterEntry | None:
        """Exactly (owner, name), live."""
        return self._registry.get(owner, name)

    def visible(self, tenant: str | None) -> list[AdapterEntry]:
        """What `tenant` may use (its own, then the shared ones it does not shadow)."""
        return self._registry.visible(tenant)

    def entries(self) -> list[AdapterEntry]:
        """Every live adapter of every owner: for the admin."""
        return self._registry.entries()

    def exists(self, adapter: AdapterRef | str) -> bool:
        """Whether a request for `adapter` (a version, or a shared name) can still be admitted."""
        key = adapter.key if isinstance(adapter, AdapterRef) else (None, adapter)
        return key in self._registry

    def is_dora(self, ref: AdapterRef) -> bool:
        """Whether version `ref` is known to be a DoRA adapter (False while only listed, unread)."""
        entry = self._registry.version(ref)
        return entry is not None and bool(entry.summary.use_dora)

    def residency(self, ref: AdapterRef) -> tuple[bool, bool]:
        """(in the host cache, in a device slot): a snapshot, for listings."""
        return self._cache.is_resident(ref), self._slots.is_resident(ref)

    def changes_since(self, generation: int) -> RegistryChanges:
        """The registry's changes after `generation`, for a replica (O(changes))."""
        return self._registry.changes_since(generation)

    def resident(self) -> dict[AdapterRef, tuple[bool, bool]]:
        """`residency` of every adapter resident anywhere (O(resident), not O(registered))."""
        host, device = set(self._cache.resident()), set(self._slots.resident())
        return {ref: (ref in host, ref in device) for ref in host | device if isinstance(ref, AdapterRef)}

    # --- registration (any thread; blocking I/O) -------------------------------------------------
    def load_path(self, owner: str | None, name: str, path: str, *, pinned: bool = False) -> AdapterEntry:
        """Register the adapter directory `path` (under an allowed root) as (owner, name), parsed
        and validated once, in full (NaN/Inf included), and warm it into the host cache."""
        r = self._registry
        r.check_name(owner, name)  # before any file is touched
        where = r.check_allowed(path)
        summary, weights = parse_peft_adapter(where, r.arch, name=name, max_rank=r.max_rank, max_bytes=r.max_bytes)
        weights = self._prepare(weights)
        entry = r.add(owner, name, where, "admin", summary=summary, pinned=pinned)
        self._cache.offer(entry.ref, weights)
        return entry

    def upload(self, owner: str | None, name: str, files: dict[str, bytes], *,
               max_adapters: int | None = None, max_bytes: int | None = None) -> AdapterEntry:
        """Add an adapter to the store from its two files (CONFIG_NAME, WEIGHTS_NAME): written to a
        temp directory, validated in full there, checked against the owner's quota (`max_bytes`:
        the weights files of all its adapters), then renamed into place and registered. Any
        refusal leaves nothing behind."""
        if self._store is None:
            raise AdapterError(NO_STORE, "this server has no adapter store (--adapters-dir): uploads are off")
        r = self._registry
        r.check_name(owner, name)
        with self._upload_lock:
            self._check_quota(owner, name, len(files[WEIGHTS_NAME]), max_adapters, max_bytes)
            staged = self._store.stage(files)
            try:
                summary, weights = parse_peft_adapter(staged, r.arch, name=name, max_rank=r.max_rank,
                                                      max_bytes=r.max_bytes)
                weights = self._prepare(weights)
            except BaseException:
                self._store.discard(staged)
                raise
            where = self._store.commit(staged, owner, name)
            try:
                entry = r.add(owner, name, where, "upload", summary=replace(summary, where=where))
            except BaseException:
                self._store.remove_trashed(self._store.trash(where))
                raise
        self._cache.offer(entry.ref, weights)
        return entry

    def _prepare(self, adapter: LoraAdapter) -> LoraAdapter:
        """What every load computes once from the weights beyond the parse (which computes the routing
        prototypes): a DoRA adapter's rescale against the base weights. Any thread."""
        return with_dora_scales(adapter, self._base_weight)

    def _check_quota(self, owner: str | None, name: str, nbytes: int, max_adapters: int | None,
                     max_bytes: int | None) -> None:
        if (owner, name) in self._registry:
            raise AdapterError(EXISTS, f"an adapter named {name!r} is already registered")
        owned = self._registry.owned(owner) if owner is not None else []
        if max_adapters is not None and len(owned) + 1 > max_adapters:
            raise AdapterError(QUOTA, f"adapter quota reached: {len(owned)} of {max_adapters} adapters; "
                                      "delete one first")
        used = sum(e.summary.file_bytes for e in owned)
        if max_bytes is not None and used + nbytes > max_bytes:
            raise AdapterError(QUOTA, f"adapter storage quota: {used} + {nbytes} bytes would pass {max_bytes}")

    def set_pinned(self, owner: str | None, name: str, pinned: bool) -> AdapterEntry:
        return self._registry.set_pinned(owner, name, pinned)

    # --- engine thread ----------------------------------------------------------------------------
    def unregister(self, owner: str | None, name: str, *, delete_files: bool = False) -> AdapterEntry:
        """New requests for (owner, name) 404 from now; running ones finish with their weights.
        `delete_files`: also remove it from the store (its files move to the trash until retired)."""
        entry = self._registry.remove(owner, name)
        stored = entry.source in ("store", "upload")  # never files an admin merely pointed at
        if delete_files and stored and self._store is not None and self._store.holds(entry.summary.where):
            self._registry.move(entry.ref, self._store.take_out(owner, name, entry.summary.where))
        if not self._users[entry.ref]:
            self._retire(entry.ref)
        else:
            log.info("adapter %s unregistered; draining %d requests", entry.ref, self._users[entry.ref])
        return entry

    def acquire(self, adapter: AdapterRef | str) -> AdapterRef:
        """Hold the live version of `adapter` (a version resolved earlier, or a shared name) for one
        request; AdapterError(NOT_FOUND) if it is gone. Its load starts when the scheduler
        prefetches it (`prefetch`), not here: a long queue must not load all its adapters at once."""
        key = adapter.key if isinstance(adapter, AdapterRef) else (None, adapter)
        entry = self._registry.get(*key)  # a version replaced since it was resolved: the new one
        if entry is None:
            raise AdapterError(NOT_FOUND, f"no adapter named {key[1]!r}")
        self._users[entry.ref] += 1
        self._cache.touch(entry.ref)  # counts a cache hit or miss
        return entry.ref

    def release(self, ref: AdapterRef) -> None:
        """A request holding `ref` finished; the last one out of a draining version retires it."""
        self._users[ref] -= 1
        if self._users[ref] <= 0:
            del self._users[ref]
            if not self._registry.is_live(ref):
                self._retire(ref)

    def is_ready(self, ref: AdapterRef) -> bool:
        return self._cache.is_resident(ref)

    def state_of(self, ref: AdapterRef) -> AdapterState:
        """The scheduler's view (server/engine/residency.py)."""
        if self._cache.is_resident(ref):
            return AdapterState.RESIDENT
        return AdapterState.LOADING if self._cache.is_loading(ref) else AdapterState.COLD

    def prefetch(self, refs: Iterable[AdapterRef], keep: set[AdapterRef]) -> list[AdapterRef]:
        """Start host-cache loads for `refs`, most wanted first, without evicting `keep`
        (HostAdapterCache.prefetch); returns the loads started."""
        return self._cache.prefetch(refs, keep)

    def poll(self, in_use: Callable[[], Iterable[AdapterRef]]) -> dict[AdapterRef, AdapterError]:
        """Take in finished loads (see HostAdapterCache.poll); returns the failed ones."""
        return self._cache.poll(in_use)

    def pages_of(self, ref: AdapterRef) -> int:
        """Pool pages `ref` takes in a step (exact once it is in the host cache; else its
        worst case, rank --max-lora-rank)."""
        return self._slots.pages_for(self._cache.rank_of(ref) or self._slots.max_rank)

    def activate(self, refs: Iterable[AdapterRef]) -> StepLora:
        """Place one step's adapters (all resident in the host cache, within `step_limit` and
        `step_pages`) in the device pool; those not in it yet are copied in from the host cache."""
        refs = sorted(refs, key=lambda r: (r.owner or "", r.name))
        if len(refs) > self.step_limit:
            raise ValueError(f"{len(refs)} adapters in one step; at most {self.step_limit}")
        weights = {ref: self._cache.get(ref) for ref in refs}  # also keeps them recent in the host LRU
        slot_of = self._slots.activate(weights)
        return StepLora(slot_of, self._slots.slot_rank, self._slots.num_slots, self._slots)

    @property
    def step_limit(self) -> int:
        """Distinct adapters one step may use, whatever their ranks: the pool's slots, under
        --max-loras if set (the scheduler's per-step count; its pages are `step_pages`)."""
        n = self._slots.num_slots
        return n if self._step_limit is None else max(1, min(n, self._step_limit))

    @property
    def step_pages(self) -> int:
        """Pool pages one step's adapters may take together (the scheduler's per-step page budget)."""
        return self._slots.num_pages

    @property
    def step_capacity(self) -> int:
        """Distinct adapters of rank --max-lora-rank one step can always use: the bound a request's
        mixture or route is checked against (smaller adapters take fewer pages, so more fit)."""
        return max(1, min(self.step_limit, self._slots.num_pages * self._slots.page_rank // self._slots.max_rank))

    @property
    def pool(self) -> LoraSlots:
        """The device pool the LoRA backend reads (CUDA graphs capture their LoRA over it)."""
        return self._slots

    @property
    def pool_resident(self) -> int:
        """Adapters in the device pool now (all of them free again once none is registered)."""
        return self._slots.num_resident

    @property
    def slot_nbytes(self) -> int:
        """Device bytes of one adapter of rank --max-lora-rank in the pool (its slot and pages)."""
        return self._slots.adapter_nbytes

    def num_users(self, ref: AdapterRef) -> int:
        return self._users[ref]

    def _retire(self, ref: AdapterRef) -> None:
        entry = self._registry.version(ref)
        self._cache.drop(ref)
        self._slots.evict(ref)
        self._registry.retire(ref)
        if self._registry.get(*ref.key) is None:  # series are by name: a newer version may serve it now
            self._metrics.forget_adapter(str(ref))
        if entry is not None and self._store is not None:
            self._store.remove_trashed(entry.summary.where)
        log.info("adapter %s retired", ref)
