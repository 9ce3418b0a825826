"""The device tier: a pool of adapter slots sized in bytes (read by the LoRA backend).

Per layer and per fused projection group the pool holds
    a [num_layers, N, n_slices * R, in]   (each slice's lora_A, zero-padded to rank R)
    b [num_layers, N, out_total, R]       (slices' lora_B * scale, concatenated along out)
    proto [num_layers, N, n_slices, in]   (each slice's Arrow routing prototype; zero if not adapted)
    proto_valid [num_layers, N, n_slices] (bool: the slot's adapter adapts that slice)
    dora [num_layers, N, out_total]       (float32 DoRA rescale g; 1.0 where not DoRA / not adapted)
so one LoRA kernel call serves every token of every adapter in one call per projection,
and the fused qkv / gate_up GEMMs keep their LoRA as one shrink + one expand launch.
Which PEFT modules stack into which group is the model's (`ModelArch.lora_groups`, from the
family registry): q/k/v are three slices of `qkv`, a fused `qkv_proj` is one.

N comes from the byte budget (`LoraSlots.sized`), so a step may use as many distinct adapters
as the pool holds; R is --max-lora-rank for every slot (a rank-4 adapter still takes a
rank-R slot: rank-unit pages are the next step). A slot is (re)written only when an adapter
that is not resident is needed by a step; the victim is the least recently used adapter the
step does not use. The tensors are allocated empty: a slot is zeroed when first written, so
on CPU the pool's untouched slots take no memory.

The host cache's loader thread writes each adapter it loads straight into a slot
(`write_in_place`: a free one, else the least recently used adapter that no step and no kept
request uses), so activating it is a lookup, not a copy. On CPU, where the pool and the host
cache are the same memory, that is the whole story. On a GPU the write is the host -> device
copy: it runs on a CUDA stream of its own, overlapped with the steps on the compute stream, and
the loader thread waits for it (the engine never does) before the slot counts as resident, so a
step launched afterwards reads finished weights. The engine thread's `activate` and a loader's `write_in_place` share the bookkeeping
under one lock; a slot being written is neither free nor resident, and a step that needs every
slot while one is being written waits for that write (one adapter, ~10 ms).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping

import torch

from server.metrics import Metrics
from server.model.arch import ModelArch

from .lora_weights import LoraAdapter



def _group_shapes(arch: ModelArch) -> dict[str, tuple[int, int, int]]:
    """pool group -> (slices, in_features, out_total)."""
    shapes = {}
    for group, modules in arch.lora_groups.items():
        shapes[group] = (len(modules), arch.linear_shape(modules[0])[0],
                         sum(arch.linear_shape(m)[1] for m in modules))
    return shapes


class LoraSlots:
    @staticmethod
    def slot_nbytes(arch: ModelArch, max_rank: int, dtype: torch.dtype) -> int:
        """Bytes of one slot: every layer's A and B of every group at rank `max_rank`, its routing
        prototypes (in `dtype`) and flags, and its DoRA rescale (float32)."""
        esz = torch.empty((), dtype=dtype).element_size()
        per_layer = sum((n * max_rank * i + o * max_rank + n * i) * esz + n + o * 4
                        for n, i, o in _group_shapes(arch).values())
        return arch.num_layers * per_layer

    @classmethod
    def sized(cls, arch: ModelArch, pool_bytes: int, max_rank: int, dtype: torch.dtype, device: torch.device,
              metrics: Metrics, max_slots: int) -> "LoraSlots":
        """As many slots as `pool_bytes` holds, at most `max_slots`; ValueError if not even one."""
        one = cls.slot_nbytes(arch, max_rank, dtype)
        if pool_bytes < one:
            raise ValueError(f"--lora-pool-memory {pool_bytes} bytes holds no adapter: one of rank {max_rank} "
                             f"takes {one} bytes ({one / 2**20:.1f} MiB) in {dtype}")
        return cls(arch, max(1, min(pool_bytes // one, max_slots)), max_rank, dtype, device, metrics)

    def __init__(self, arch: ModelArch, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, metrics: Metrics):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.metrics = metrics
        L, N, R = arch.num_layers, num_slots, max_rank
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
            self.a[group] = torch.empty(L, N, len(modules) * R, in_features, dtype=dtype, device=device)
            self.b[group] = torch.empty(L, N, sum(outs), R, dtype=dtype, device=device)
            self.proto[group] = torch.empty(L, N, len(modules), in_features, dtype=dtype, device=device)
            self.proto_valid[group] = torch.empty(L, N, len(modules), dtype=torch.bool, device=device)
            self.dora[group] = torch.empty(L, N, sum(outs), dtype=torch.float32, device=device)
            offsets = [0]
            for o in outs:
                offsets.append(offsets[-1] + o)
            self.offsets[group] = tuple(offsets)
        # Per-layer views, made once: the hot path indexes lists, it builds no tensors.
        self.layer_a = {g: list(t.unbind(0)) for g, t in self.a.items()}
        self.layer_b = {g: list(t.unbind(0)) for g, t in self.b.items()}
        self.layer_proto = {g: list(t.unbind(0)) for g, t in self.proto.items()}  # [N, n_slices, in]
        self.layer_proto_valid = {g: list(t.unbind(0)) for g, t in self.proto_valid.items()}  # [N, n_slices]
        self.layer_dora = {g: list(t.unbind(0)) for g, t in self.dora.items()}  # [N, out_total]
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # resident adapters, least recently used first
        self._free = list(range(N - 1, -1, -1))  # popped from the end: lowest slot first
        self.slot_rank = [0] * N
        self.slot_dora = [False] * N  # host: the slot's adapter is DoRA (its tokens need the rescale)
        # host: the groups the slot's adapter adapts; a step none of whose slots adapts a group
        # may skip that group's LoRA (its weights are zero in every slot of the step)
        self.slot_groups: list[frozenset[str]] = [frozenset()] * N
        self._num_linears = L * sum(len(m) for m in self.groups.values())  # (layer, module) pairs of a slot
        self._lock = threading.Condition()  # slot bookkeeping: the engine thread and a loader thread
        self._writing = 0  # slots a loader is writing now (neither free nor resident)
        self._step: frozenset[Hashable] = frozenset()  # the adapters of the last activated step
        self._kept: frozenset[Hashable] = frozenset()  # adapters a loader must not write over (`protect`)
        # GPU: loaders copy on their own stream, so their copies overlap the steps' kernels
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # recorded on the compute stream at each activate: the steps before it, which may still be
        # running (a step that samples nothing never waits for the GPU), may read any slot
        self._stepped = torch.cuda.Event() if self._copy_stream is not None else None

    @property
    def nbytes(self) -> int:
        tensors = (*self.a.values(), *self.b.values(), *self.proto.values(), *self.proto_valid.values(),
                   *self.dora.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def activate(self, adapters: Mapping[Hashable, LoraAdapter]) -> dict[Hashable, int]:
        """Make every adapter of this step resident (at most `num_slots` of them) -> name: slot.
        Cost: O(adapters of the step) plus one slot write per adapter not yet resident."""
        if len(adapters) > self.num_slots:
            raise ValueError(f"{len(adapters)} adapters in one step but only {self.num_slots} slots")
        with self._lock:
            self._step = frozenset(adapters)  # from now on no loader writes over them
            if self._stepped is not None:
                self._stepped.record()
            for name in adapters:
                if name in self._slot_of:
                    self._slot_of.move_to_end(name)
            for name, adapter in adapters.items():
                if name in self._slot_of:
                    continue
                slot = self._take(self._step)
                while slot is None:  # every other slot is being written by a loader: wait for it
                    assert self._writing, "no slot for an adapter of the step"
                    self._lock.wait()
                    slot = self._take(self._step)
                self._write(slot, adapter)
                self._slot_of[name] = slot
            self.metrics.adapters_resident.labels("device").set(len(self._slot_of))
            return {name: self._slot_of[name] for name in adapters}

    def protect(self, names: Iterable[Hashable]) -> None:
        """Engine thread: the adapters a loader's `write_in_place` must not write over (those of
        running and about-to-run requests), besides the last step's."""
        with self._lock:
            self._kept = frozenset(names)

    def write_in_place(self, name: Hashable, adapter: LoraAdapter) -> bool:
        """Any thread (the host cache's loader, or an admin load): make `adapter` resident as `name` now, in a
        free slot or over the least recently used adapter that is neither in the last step nor
        protected. False (nothing written) when every slot is in use: `activate` copies it later."""
        with self._lock:
            if name in self._slot_of:
                return True
            slot = self._take(self._step | self._kept)
            if slot is None:
                return False
            if self._copy_stream is not None:  # the slot's last reader may be a step still on the GPU
                self._copy_stream.wait_event(self._stepped)
            self._writing += 1
        try:
            self._write_async(slot, adapter)  # outside the lock: steps run on, they never read this slot
        except BaseException:
            with self._lock:
                self._release(slot)
                raise
        else:
            with self._lock:
                self._slot_of[name] = slot
                self.metrics.adapters_resident.labels("device").set(len(self._slot_of))
            return True
        finally:
            with self._lock:
                self._writing -= 1
                self._lock.notify_all()

    def _take(self, busy: frozenset[Hashable]) -> int | None:
        """Under the lock: a free slot, else the slot of the least recently used adapter not in
        `busy` (evicted); None if there is neither."""
        if self._free:
            return self._free.pop()
        victim = next((n for n in self._slot_of if n not in busy), None)
        if victim is None:
            return None
        self.metrics.adapter_evictions.labels("device").inc()
        return self._slot_of.pop(victim)

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self.slot_rank[slot] = 0
        self.slot_dora[slot] = False
        self.slot_groups[slot] = frozenset()

    def is_resident(self, name: Hashable) -> bool:
        return name in self._slot_of

    def resident(self) -> list[Hashable]:
        """The adapters in the pool now (any thread)."""
        with self._lock:
            return list(self._slot_of)

    def evict(self, name: Hashable) -> None:
        """Forget `name` (unregistered or replaced); its slot is free, rewritten before any reuse."""
        with self._lock:
            slot = self._slot_of.pop(name, None)
            if slot is not None:
                self._release(slot)
                self.metrics.adapters_resident.labels("device").set(len(self._slot_of))

    def _write_async(self, slot: int, adapter: LoraAdapter) -> None:
        """A loader's write: on a GPU on the copy stream, waited for on this (the loader's) thread."""
        if self._copy_stream is None:
            self._write(slot, adapter)
            return
        with torch.cuda.stream(self._copy_stream):
            self._write(slot, adapter)
        self._copy_stream.synchronize()

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot` (B pre-scaled) with one multi-tensor copy per operand; the
        slot is zeroed first unless the adapter fills all of it (every module of every layer at
        rank R); prototypes and their flags are built on the host and copied once per group.
        ~9-11 ms thread CPU time for a rank-16 SmolLM2-135M adapter on every projection, on CPU
        (docs/benchmarks_kernels.md; ~1.5 ms of it for the prototypes since issue 12)."""
        if not adapter.dora_ready:
            raise ValueError("a DoRA adapter needs its dora_scale (dora.with_dora_scales) before a slot write")
        R = self.max_rank
        missing = len(adapter.modules) < self._num_linears
        if missing or any(w.rank < R for w in adapter.modules.values()):
            for group in self.groups:
                self.a[group][:, slot].zero_()
                self.b[group][:, slot].zero_()
        if missing or not adapter.use_dora:
            for group in self.groups:
                self.dora[group][:, slot].fill_(1.0)
        adapted: dict[str, list[int]] = {g: [] for g in self.groups}  # flat (layer, slice) indices per group
        protos: dict[str, list[torch.Tensor]] = {g: [] for g in self.groups}  # their prototypes, same order
        a_dst, a_src, b_dst, b_src, scales, g_dst, g_src = [], [], [], [], [], [], []
        for (layer, module), w in adapter.modules.items():
            group, i = self._slice_of[module]
            lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
            a_dst.append(self.layer_a[group][layer][slot, i * R: i * R + w.rank])
            a_src.append(w.a)
            b_dst.append(self.layer_b[group][layer][slot, lo:hi, : w.rank])
            b_src.append(w.b)
            scales.append(w.scale)
            adapted[group].append(layer * len(self.groups[group]) + i)
            protos[group].append(w.prototype)
            if w.dora_scale is not None:
                g_dst.append(self.layer_dora[group][layer][slot, lo:hi])
                g_src.append(w.dora_scale)
        if a_dst:
            torch._foreach_copy_(a_dst, a_src)
            # The scale is folded into B once here (in fp32, one rounding), so the kernels never see it.
            torch._foreach_copy_(b_dst, torch._foreach_mul(b_src, scales))
        if g_dst:
            torch._foreach_copy_(g_dst, g_src)
        for group, flat in adapted.items():
            # Prototypes and flags of the whole slot, built on the host (zero / False where not adapted):
            # one copy each per group instead of one view per module.
            dst = self.proto[group][:, slot]  # [L, n_slices, in]
            proto = torch.zeros(dst.shape, dtype=torch.float32)
            flags = torch.zeros(dst.shape[:2], dtype=torch.bool)
            if flat:
                proto.view(-1, dst.shape[-1])[flat] = torch.stack(protos[group])
                flags.view(-1)[flat] = True
            dst.copy_(proto)
            self.proto_valid[group][:, slot].copy_(flags)
        self.slot_rank[slot] = adapter.rank
        self.slot_dora[slot] = adapter.use_dora
        self.slot_groups[slot] = frozenset(g for g, flat in adapted.items() if flat)
        self.metrics.adapter_slot_writes.inc()
