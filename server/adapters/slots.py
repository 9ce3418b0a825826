"""The device tier: a pool of adapter weights in rank-unit pages, sized in bytes (read by the LoRA backend).

An adapter in the pool has a *slot* (a handle: its per-adapter tensors below) and rank-unit
*pages* holding its weights: with page rank u, an adapter of rank r takes ceil(r / u) pages,
anywhere in the pool (S-LoRA's unified paging, for adapter weights), so a rank-4 adapter no
longer takes the bytes of a rank-R one. Per layer and per fused projection group:
    a [num_layers, P, n_slices * u, in]   (page p, rows i*u + c: slice i's lora_A row j*u + c of
                                           the adapter whose j-th page p is)
    b [num_layers, P, out_total, u]       (slices' lora_B * scale, concatenated along out)
    proto [num_layers, N, n_slices, in]   (each slice's Arrow routing prototype; zero if not adapted)
    proto_valid [num_layers, N, n_slices] (bool: the slot's adapter adapts that slice)
    dora [num_layers, N, out_total]       (float32 DoRA rescale g; 1.0 where not DoRA / not adapted)
and `pages` [N, R / u] int32 on the device: slot s's j-th page (entries past its adapter's pages
hold page 0; the kernels never read past a segment's rank). The LoRA kernels take the page table
with the pool (kernels/lora.py `pages=`), so one kernel call per projection serves every token
of every adapter, and the fused qkv / gate_up GEMMs keep one shrink + one expand launch.
With u = R (the torch backend, whose CPU kernels run over the pool as a view, and any pool
whose --max-lora-rank is the page rank) slot s's one page is page s and `pages` is None:
the layout is the plain slot pool [L, N, n*R, in]. Which PEFT modules stack into which group is
the model's (`ModelArch.lora_groups`, from the family registry).

N and P come from the byte budget (`LoraSlots.sized`): one slot per page (worst case: every
adapter of rank <= u), so a step may use as many distinct adapters as their pages fit. A slot
is (re)written only when an adapter that is not resident is needed by a step; the victims are
the least recently used adapters the step does not use, until a slot and enough pages are free
(the bookkeeping is `pool_book.PoolBook`; this module holds the tensors and writes them).
The tensors are allocated empty: pages are zeroed when first written, so on CPU the pool's
untouched pages take no memory.

The host cache's loader thread writes each adapter it loads straight into the pool
(`write_in_place`: free pages, else those of the least recently used adapters that no step and
no kept request uses), so activating it is a lookup, not a copy. On CPU that write is a plain copy
on the loader thread, and that is the whole story. On a GPU the write is the host -> device
copy: it runs on a CUDA stream of its own, overlapped with the steps on the compute stream, and
the loader thread waits for it (the engine never does) before the adapter counts as resident, so
a step launched afterwards reads finished weights. The engine thread's `activate` and a loader's
`write_in_place` share the bookkeeping under one lock; pages being written are neither free nor
resident, and a step that needs them while they are being written waits for that write (one
adapter, ~10 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable, Mapping

import torch

from server.metrics import Metrics
from server.model.arch import ModelArch

from .lora_weights import LoraAdapter
from .pool_book import PoolBook
from .staging import copy_into, stage



def _group_shapes(arch: ModelArch) -> dict[str, tuple[int, int, int]]:
    """pool group -> (slices, in_features, out_total)."""
    shapes = {}
    for group, modules in arch.lora_groups.items():
        shapes[group] = (len(modules), arch.linear_shape(modules[0])[0],
                         sum(arch.linear_shape(m)[1] for m in modules))
    return shapes


class LoraSlots:
    @staticmethod
    def page_nbytes(arch: ModelArch, page_rank: int, dtype: torch.dtype) -> int:
        """Bytes of one page: every layer's A and B of every group at rank `page_rank`."""
        esz = torch.empty((), dtype=dtype).element_size()
        return arch.num_layers * sum((n * i + o) * page_rank * esz for n, i, o in _group_shapes(arch).values())

    @staticmethod
    def handle_nbytes(arch: ModelArch, dtype: torch.dtype, pages_per_slot: int = 1) -> int:
        """Bytes of one slot's own tensors: its routing prototypes (in `dtype`) and their flags, and
        its DoRA rescale (float32), every layer and group; paged (`pages_per_slot` > 1), its row
        of the page table and its rank (int32)."""
        esz = torch.empty((), dtype=dtype).element_size()
        paged = 4 * (pages_per_slot + 1) if pages_per_slot > 1 else 0
        return paged + arch.num_layers * sum(n * i * esz + n + o * 4 for n, i, o in _group_shapes(arch).values())

    @classmethod
    def slot_nbytes(cls, arch: ModelArch, max_rank: int, dtype: torch.dtype) -> int:
        """Bytes of one adapter of rank `max_rank`: its slot and its pages."""
        return cls.page_nbytes(arch, max_rank, dtype) + cls.handle_nbytes(arch, dtype)

    @classmethod
    def sized(cls, arch: ModelArch, pool_bytes: int, max_rank: int, dtype: torch.dtype, device: torch.device,
              metrics: Metrics, max_slots: int, page_rank: int | None = None) -> "LoraSlots":
        """The pool `pool_bytes` holds: one slot per page of rank `page_rank` (default `max_rank`:
        unpaged), at most `max_slots` slots, and no more pages than those slots fill at rank
        `max_rank`; always room for one adapter of rank `max_rank`. ValueError if not even that."""
        u = page_rank or max_rank
        if u <= 0 or max_rank % u:
            raise ValueError(f"the page rank {u} must divide --max-lora-rank {max_rank}")
        per = max_rank // u
        page, handle = cls.page_nbytes(arch, u, dtype), cls.handle_nbytes(arch, dtype, per)
        full = per * page + handle
        if pool_bytes < full:
            raise ValueError(f"--lora-pool-memory {pool_bytes} bytes holds no adapter: one of rank {max_rank} "
                             f"takes {full} bytes ({full / 2**20:.1f} MiB) in {dtype}")
        slots = max(1, min(pool_bytes // (page + handle), (pool_bytes - per * page) // handle, max_slots))
        pages = min(slots * per, (pool_bytes - slots * handle) // page)
        return cls(arch, slots, max_rank, dtype, device, metrics, page_rank=u, num_pages=pages)

    def __init__(self, arch: ModelArch, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, metrics: Metrics, *, page_rank: int | None = None,
                 num_pages: int | None = None):
        """`page_rank` (default `max_rank`, unpaged) must divide `max_rank`; `num_pages` (default:
        every slot at rank `max_rank`) must equal `num_slots` when unpaged."""
        u = page_rank or max_rank
        per = max_rank // u
        P = num_slots * per if num_pages is None else num_pages
        if max_rank % u or P < per or (per == 1 and P != num_slots):
            raise ValueError(f"pool of {num_slots} slots, {P} pages of rank {u}: invalid for rank {max_rank}")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.page_rank = u
        self.num_pages = P
        self.paged = per > 1
        self.adapter_nbytes = self.slot_nbytes(arch, max_rank, dtype)  # one adapter of rank max_rank
        self.metrics = metrics
        self.device = device
        L, N = arch.num_layers, num_slots
        self.groups = arch.lora_groups  # pool group (the model's fused linear) -> PEFT modules, output order
        self._slice_of = {m: (g, i) for g, modules in self.groups.items() for i, m in enumerate(modules)}
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.proto: dict[str, torch.Tensor] = {}
        self.proto_valid: dict[str, torch.Tensor] = {}
        self.dora: dict[str, torch.Tensor] = {}
        self.offsets: dict[str, tuple[int, ...]] = {}
        for group, modules in self.groups.items():
            in_features = arch.linear_shape(modules[0])[0]
            outs = [arch.linear_shape(m)[1] for m in modules]
            self.a[group] = torch.empty(L, P, len(modules) * u, in_features, dtype=dtype, device=device)
            self.b[group] = torch.empty(L, P, sum(outs), u, dtype=dtype, device=device)
            self.proto[group] = torch.empty(L, N, len(modules), in_features, dtype=dtype, device=device)
            self.proto_valid[group] = torch.empty(L, N, len(modules), dtype=torch.bool, device=device)
            self.dora[group] = torch.empty(L, N, sum(outs), dtype=torch.float32, device=device)
            offsets = [0]
            for o in outs:
                offsets.append(offsets[-1] + o)
            self.offsets[group] = tuple(offsets)
        # The page table the kernels read (None unpaged: slot s's page is s). Rows are rewritten
        # with their slot; entries past an adapter's pages stay a valid page (0), never read.
        self.pages = torch.zeros(N, per, dtype=torch.int32, device=device) if self.paged else None
        # each slot's adapter rank on the device (None unpaged): the dense mixture paths mask by it,
        # having no segment rank (unpaged, B is zero past the rank instead)
        self.ranks = torch.zeros(N, dtype=torch.int32, device=device) if self.paged else None
        # Per-layer views, made once: the hot path indexes lists, it builds no tensors.
        self.layer_a = {g: list(t.unbind(0)) for g, t in self.a.items()}
        self.layer_b = {g: list(t.unbind(0)) for g, t in self.b.items()}
        self.layer_proto = {g: list(t.unbind(0)) for g, t in self.proto.items()}  # [N, n_slices, in]
        self.layer_proto_valid = {g: list(t.unbind(0)) for g, t in self.proto_valid.items()}  # [N, n_slices]
        self.layer_dora = {g: list(t.unbind(0)) for g, t in self.dora.items()}  # [N, out_total]
        self.book = PoolBook(N, P, self.paged)  # who holds which slot and pages (under the lock)
        self.slot_rank = [0] * N
        self.slot_dora = [False] * N  # host: the slot's adapter is DoRA (its tokens need the rescale)
        # host: the groups the slot's adapter adapts; a step none of whose slots adapts a group
        # may skip that group's LoRA (its weights are zero in every slot of the step)
        self.slot_groups: list[frozenset[str]] = [frozenset()] * N
        self._num_linears = L * sum(len(m) for m in self.groups.values())  # (layer, module) pairs of a slot
        self._lock = threading.Condition()  # slot bookkeeping: the engine thread and a loader thread
        self._writing = 0  # slots a loader is writing now (neither free nor resident)
        self._waiting = False  # `activate` waits for loaders' writes to finish: no new ones start
        self._step: frozenset[Hashable] = frozenset()  # the adapters of the last activated step
        self._kept: frozenset[Hashable] = frozenset()  # adapters a loader must not write over (`protect`)
        # GPU: loaders copy on their own stream, so their copies overlap the steps' kernels
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # recorded on the compute stream at each activate: the steps before it, which may still be
        # running (a step that samples nothing never waits for the GPU), may read any slot
        self._stepped = torch.cuda.Event() if self._copy_stream is not None else None
        self._publish()

    def _publish(self) -> None:
        """Under the lock: the pool's gauges (pages being written count as used)."""
        free = self.book.free_pages
        self.metrics.adapters_resident.labels("device").set(len(self.book))
        self.metrics.adapter_pool_pages.labels("used").set(self.num_pages - free)
        self.metrics.adapter_pool_pages.labels("free").set(free)

    def pages_for(self, rank: int) -> int:
        """Pages an adapter of `rank` takes."""
        return max(1, -(-rank // self.page_rank))

    @property
    def nbytes(self) -> int:
        tensors = (*self.a.values(), *self.b.values(), *self.proto.values(), *self.proto_valid.values(),
                   *self.dora.values(), *(() if self.pages is None else (self.pages, self.ranks)))
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_resident(self) -> int:
        return len(self.book)

    def activate(self, adapters: Mapping[Hashable, LoraAdapter]) -> dict[Hashable, int]:
        """Make every adapter of this step resident (at most `num_slots` of them, their pages at
        most `num_pages`) -> name: slot. Cost: O(adapters of the step) plus one write per adapter
        not yet resident."""
        need = {name: self.pages_for(adapter.rank) for name, adapter in adapters.items()}
        if len(adapters) > self.num_slots or sum(need.values()) > self.num_pages:
            raise ValueError(f"{len(adapters)} adapters of {sum(need.values())} pages in one step but the pool "
                             f"has {self.num_slots} slots, {self.num_pages} pages")
        with self._lock:
            self._step = frozenset(adapters)  # from now on no loader writes over them
            if self._stepped is not None:
                self._stepped.record()
            book = self.book
            for name in adapters:
                if name in book:
                    book.touch(name)
            for name, adapter in adapters.items():
                slot = None if name in book else self._take(self._step, need[name])
                while slot is None and name not in book:
                    # the rest of the pool is being written by loaders: wait for them, and keep
                    # new loader writes off meanwhile (they could take what those free)
                    if not self._writing:
                        raise RuntimeError(f"no room in the adapter pool for {name} of the step")
                    self._waiting = True
                    try:
                        self._lock.wait()
                    finally:
                        self._waiting = False
                    slot = None if name in book else self._take(self._step, need[name])
                if slot is None:
                    continue
                try:
                    self._write(slot, adapter)
                except BaseException:
                    self._release(slot)
                    if self._stepped is not None:  # a loader reusing these pages waits for the partial write
                        self._stepped.record()
                    self._publish()
                    raise
                book.commit(name, slot)
            self._publish()
            return {name: book.slot_of(name) for name in adapters}

    def protect(self, names: Iterable[Hashable]) -> None:
        """Engine thread: the adapters a loader's `write_in_place` must not write over (those of
        running and about-to-run requests), besides the last step's."""
        with self._lock:
            self._kept = frozenset(names)

    def write_in_place(self, name: Hashable, adapter: LoraAdapter) -> bool:
        """Any thread (the host cache's loader, or an admin load): make `adapter` resident as `name` now, in
        free pages or over the least recently used adapters that are neither in the last step nor
        protected. False (nothing written) when the pool is in use: `activate` copies it later."""
        with self._lock:
            if name in self.book:
                return True
            if self._waiting:  # a step waits for room: leave what frees up to it
                return False
            slot = self._take(self._step | self._kept, self.pages_for(adapter.rank))
            if slot is None:
                return False
            if self._copy_stream is not None:  # the slot's last reader may be a step still on the GPU
                self._copy_stream.wait_event(self._stepped)
            self._writing += 1
        try:
            self._write_async(slot, adapter)  # outside the lock: steps run on, they never read this slot
        except BaseException:
            if self._copy_stream is not None:  # what it queued lands before the pages are reused
                self._copy_stream.synchronize()
            with self._lock:
                self._release(slot)
                self._publish()
                raise
        else:
            with self._lock:
                if name in self.book:  # another writer of this adapter (an admin load, a loader) was first
                    self._release(slot)
                else:
                    self.book.commit(name, slot)
                self._publish()
            return True
        finally:
            with self._lock:
                self._writing -= 1
                self._lock.notify_all()

    def _take(self, busy: frozenset[Hashable], need: int) -> int | None:
        """Under the lock: a slot with `need` pages (PoolBook.take), evicting least recently used
        adapters not in `busy` as needed; None if there is no room."""
        taken = self.book.take(busy, need)
        if taken is None:
            return None
        slot, evicted = taken
        for _, old in evicted:
            self.metrics.adapter_evictions.labels("device").inc()
            self._forget(old)
        return slot

    def _release(self, slot: int) -> None:
        self.book.release(slot)
        self._forget(slot)

    def _forget(self, slot: int) -> None:
        """The slot's host facts, once its adapter is gone."""
        self.slot_rank[slot] = 0
        self.slot_dora[slot] = False
        self.slot_groups[slot] = frozenset()

    def is_resident(self, name: Hashable) -> bool:
        return name in self.book

    def resident(self) -> list[Hashable]:
        """The adapters in the pool now (any thread)."""
        with self._lock:
            return self.book.names()

    def evict(self, name: Hashable) -> None:
        """Forget `name` (unregistered or replaced); its slot is free, rewritten before any reuse."""
        with self._lock:
            slot = self.book.pop(name)
            if slot is not None:
                self._release(slot)
                if self._stepped is not None:  # a loader reusing its pages waits for the steps so far
                    self._stepped.record()
                self._publish()

    def _write_async(self, slot: int, adapter: LoraAdapter) -> None:
        """A loader's write: on a GPU on the copy stream, waited for on this (the loader's) thread."""
        if self._copy_stream is None:
            self._write(slot, adapter)
            return
        with torch.cuda.stream(self._copy_stream):
            self._write(slot, adapter)
        self._copy_stream.synchronize()

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot` and its pages (B pre-scaled) with one multi-tensor copy per
        operand; the pages are zeroed first unless the adapter fills all of them (every module of
        every layer at rank pages x u); prototypes and their flags are built on the host and
        copied once per group.
        ~9-11 ms thread CPU time for a rank-16 SmolLM2-135M adapter on every projection, on CPU
        (docs/benchmarks_kernels.md; ~1.5 ms of it for the prototypes since issue 12)."""
        if not adapter.dora_ready:
            raise ValueError("a DoRA adapter needs its dora_scale (dora.with_dora_scales) before a slot write")
        u, pages = self.page_rank, self.book.pages(slot)
        missing = len(adapter.modules) < self._num_linears
        if missing or any(w.rank < len(pages) * u for w in adapter.modules.values()):
            for group in self.groups:
                for page in pages:
                    self.a[group][:, page].zero_()
                    self.b[group][:, page].zero_()
        if missing or not adapter.use_dora:
            for group in self.groups:
                self.dora[group][:, slot].fill_(1.0)
        adapted: dict[str, list[int]] = {g: [] for g in self.groups}  # flat (layer, slice) indices per group
        protos: dict[str, list[torch.Tensor]] = {g: [] for g in self.groups}  # their prototypes, same order
        # The scale is folded into B once here (in fp32, one rounding), so the kernels never see it;
        # whole modules' B (contiguous: ~10x faster than scaling each page's column slice).
        modules = list(adapter.modules.items())
        scaled = torch._foreach_mul([w.b for _, w in modules], [w.scale for _, w in modules]) if modules else []
        a_dst, a_src, b_dst, b_src, g_dst, g_src = [], [], [], [], [], []
        for ((layer, module), w), b_scaled in zip(modules, scaled):
            group, i = self._slice_of[module]
            lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
            a, b = self.layer_a[group][layer], self.layer_b[group][layer]
            for j in range(0, w.rank, u):  # the module's rank rows [j, j + c) go to page j // u
                c = min(u, w.rank - j)
                a_dst.append(a[pages[j // u], i * u: i * u + c])
                a_src.append(w.a[j:j + c])
                b_dst.append(b[pages[j // u], lo:hi, :c])
                b_src.append(b_scaled[:, j:j + c])
            adapted[group].append(layer * len(self.groups[group]) + i)
            protos[group].append(w.prototype)
            if w.dora_scale is not None:
                g_dst.append(self.layer_dora[group][layer][slot, lo:hi])
                g_src.append(w.dora_scale)
        p_dst, p_src = [], []
        for group, flat in adapted.items():
            # Prototypes and flags of the whole slot, built on the host (zero / False where not adapted):
            # one piece each per group instead of one view per module.
            dst = self.proto[group][:, slot]  # [L, n_slices, in]
            proto = torch.zeros(dst.shape, dtype=torch.float32)
            flags = torch.zeros(dst.shape[:2], dtype=torch.float32)
            if flat:
                proto.view(-1, dst.shape[-1])[flat] = torch.stack(protos[group])
                flags.view(-1)[flat] = 1.0
            p_dst += [dst, self.proto_valid[group][:, slot]]
            p_src += [proto, flags]
        # On a GPU every host piece goes up in one pinned copy, then device copies scatter it.
        src = stage([*a_src, *b_src, *g_src, *p_src], self.device, torch.float32)
        copy_into([*a_dst, *b_dst, *g_dst, *p_dst], src)  # per dtype: flags are bool, DoRA rows fp32
        if self.pages is not None:
            row = list(pages) + [0] * (self.pages.shape[1] - len(pages))
            (table,) = stage([torch.tensor(row, dtype=torch.int32)], self.device, torch.int32)
            self.pages[slot].copy_(table)
            self.ranks[slot].fill_(adapter.rank)
        self.slot_rank[slot] = adapter.rank
        self.slot_dora[slot] = adapter.use_dora
        self.slot_groups[slot] = frozenset(g for g, flat in adapted.items() if flat)
        self.metrics.adapter_slot_writes.inc()
