"""The device tier: `max_loras` slots of stacked adapter weights (read by the LoRA backend).

Per layer and per fused projection group the pool holds
    a [num_layers, N, n_slices * R, in]   (each slice's lora_A, zero-padded to rank R)
    b [num_layers, N, out_total, R]       (slices' lora_B * scale, concatenated along out)
so one LoRA kernel call serves every token of every adapter in one call per projection,
and the fused qkv / gate_up GEMMs keep their LoRA as one shrink + one expand launch.
Which PEFT modules stack into which group is the model's (`ModelArch.lora_groups`, from the
family registry): q/k/v are three slices of `qkv`, a fused `qkv_proj` is one.
A slot is (re)written only when an adapter that is not resident is needed by a step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping

import torch

from server.metrics import Metrics
from server.model.arch import ModelArch

from .lora_weights import LoraAdapter



class LoraSlots:
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
        self.offsets: dict[str, tuple[int, ...]] = {}
        for group, modules in self.groups.items():
            in_features = arch.linear_shape(modules[0])[0]
            outs = [arch.linear_shape(m)[1] for m in modules]
            self.a[group] = torch.zeros(L, N, len(modules) * R, in_features, dtype=dtype, device=device)
            self.b[group] = torch.zeros(L, N, sum(outs), R, dtype=dtype, device=device)
            offsets = [0]
            for o in outs:
                offsets.append(offsets[-1] + o)
            self.offsets[group] = tuple(offsets)
        # Per-layer views, made once: the hot path indexes lists, it builds no tensors.
        self.layer_a = {g: list(t.unbind(0)) for g, t in self.a.items()}
        self.layer_b = {g: list(t.unbind(0)) for g, t in self.b.items()}
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # resident adapters, least recently used first
        self.slot_rank = [0] * N

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def activate(self, adapters: Mapping[Hashable, LoraAdapter]) -> dict[Hashable, int]:
        """Make every adapter of this step resident (at most `num_slots` of them) -> name: slot."""
        if len(adapters) > self.num_slots:
            raise ValueError(f"{len(adapters)} adapters in one step but only {self.num_slots} slots")
        for name in adapters:
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
        used = {self._slot_of[n] for n in adapters if n in self._slot_of}
        free = [s for s in range(self.num_slots) if s not in self._slot_of.values()]
        for name, adapter in adapters.items():
            if name in self._slot_of:
                continue
            if free:
                slot = free.pop(0)
            else:  # evict the least recently used adapter this step does not need
                victim = next(n for n, s in self._slot_of.items() if s not in used)
                slot = self._slot_of.pop(victim)
                self.metrics.adapter_evictions.labels("device").inc()
            self._write(slot, adapter)
            self._slot_of[name] = slot
            used.add(slot)
        self.metrics.adapters_resident.labels("device").set(len(self._slot_of))
        return {name: self._slot_of[name] for name in adapters}

    def is_resident(self, name: Hashable) -> bool:
        return name in self._slot_of

    def evict(self, name: Hashable) -> None:
        """Forget `name` (unregistered or replaced); its slot is rewritten before any reuse."""
        self._slot_of.pop(name, None)

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        R = self.max_rank
        for group in self.groups:
            self.a[group][:, slot].zero_()
            self.b[group][:, slot].zero_()
        for (layer, module), w in adapter.modules.items():
            group, i = self._slice_of[module]
            lo, hi = self.offsets[group][i], self.offsets[group][i + 1]
            self.a[group][layer, slot, i * R: i * R + w.rank].copy_(w.a)
            # The scale is folded into B once here, so the kernels never see it.
            self.b[group][layer, slot, lo:hi, : w.rank].copy_(w.b * w.scale)
        self.slot_rank[slot] = adapter.rank
        self.metrics.adapter_slot_writes.inc()
