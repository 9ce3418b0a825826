"""LoRA backends: picked once at engine start; each builds only its kernels' segment layout.

  torch   any device: kernels/torch_ops.py (padded bmm at decode-like steps, grouped_mm over
          the slot pool otherwise): the CPU path. Its kernels run over the pool as a view, so its
          pool is unpaged (page rank = --max-lora-rank; memory is not what is scarce on a CPU).
  triton  CUDA: the Triton SGMV kernels (kernels/triton_sgmv.py) over BLOCK_M tile tables,
          reading the pool through its page table (rank-unit pages of 16 by default, so an
          adapter of rank 16 takes a quarter of a rank-64 slot's bytes).
          On CPU only under Triton's interpreter (tests). Graph-safe: `static_step` gives the
          LoRA a CUDA graph captures (server/engine/cuda_graphs.py).
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar, Sequence

import torch

from kernels import (DoraTokens, LoraRows, LoraSegments, MixTable, RouteTable, RowPlan, add_lora, add_lora_mixed,
                     add_lora_routed, add_lora_rows, dora_rescale)
from kernels.segments import static_segments
from server.adapters.slots import LoraSlots

from .availability import triton_unavailable


class LoraStep:
    """One step's LoRA (implements the decoder's `LoraApplier`): the segment table + the pool;
    `rows` when the table is over LoRA rows (mixtures, routed pairs), else it is over tokens;
    `mixed` / `routed`: the mixture / routed tokens that run dense; `dora`: the DoRA tokens.
    None: no such work."""

    def __init__(self, kernel: str, slots: LoraSlots, segments: LoraSegments, rows: LoraRows | None = None,
                 routed: RouteTable | None = None, dora: DoraTokens | None = None, mixed: MixTable | None = None):
        self.kernel = kernel
        self.slots = slots
        self.segments = segments
        self.rows = rows
        self.routed = routed
        self.dora = dora
        self.mixed = mixed
        # Projection groups none of the step's adapters adapts are skipped: their slots hold zeros
        # there (LoraSlots._write), so the kernels would only read zeros. Adapters of q/v alone
        # make most groups idle (measured 0.66x -> 0.96x of 8 adapters' throughput at 1,000).
        # (Steps with mixtures or routes use slots beyond the table's: nothing is skipped there.)
        self.idle = frozenset() if rows is not None or mixed is not None or routed is not None else frozenset(
            g for g in slots.groups if not any(g in slots.slot_groups[s] for s in segments.seg_slots))

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> None:
        if group in self.idle:
            return
        s = self.slots
        a, b, offsets, pages = s.layer_a[group][layer], s.layer_b[group][layer], s.offsets[group], s.pages
        if self.rows is None:
            add_lora(y, x, a, b, self.segments, offsets, backend=self.kernel, pages=pages)
        elif self.rows.route is None:
            add_lora_rows(y, x, a, b, self.segments, offsets, self.rows, backend=self.kernel, pages=pages)
        else:
            add_lora_rows(y, x, a, b, self.segments, offsets, self.rows, s.layer_proto[group][layer],
                          s.layer_proto_valid[group][layer], backend=self.kernel, pages=pages)
        if self.mixed is not None:
            add_lora_mixed(y, x, a, b, offsets, self.mixed, pages=pages, slot_ranks=s.ranks)
        if self.routed is not None:
            add_lora_routed(y, x, a, b, offsets, self.routed, s.layer_proto[group][layer],
                            s.layer_proto_valid[group][layer], pages=pages, slot_ranks=s.ranks)
        if self.dora is not None:
            dora_rescale(y, bias, s.layer_dora[group][layer], self.dora.token, self.dora.slot)


class LoraBackend(ABC):
    name: ClassVar[str]

    def __init__(self, device: torch.device):
        self.device = device

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this backend cannot run here, or None. Called before construction."""
        return None

    def page_rank(self, max_rank: int, choice: int | None) -> int:
        """The adapter pool's page rank for --lora-page-rank `choice` (None: this backend's own).
        Default: unpaged (one page of rank `max_rank` per adapter)."""
        if choice not in (None, max_rank):
            raise ValueError(f"--lora-page-rank {choice}: the {self.name} LoRA backend reads an unpaged pool "
                             f"(page rank = --max-lora-rank {max_rank})")
        return max_rank

    def segments(self, seg_lens: Sequence[int], seg_slots: Sequence[int], seg_ranks: Sequence[int],
                 num_slots: int) -> LoraSegments:
        """The step's segment table from the runner's host lists (tokens, slot and rank per segment,
        ascending slots), with this backend's kernel layout only, in one upload."""
        return LoraSegments.build(seg_lens, seg_slots, seg_ranks, num_slots, self.device, layouts=(self.name,))

    def planned(self, slots: LoraSlots, plan: RowPlan, slot_rank: Sequence[int], num_slots: int,
                dora: DoraTokens | None = None) -> LoraStep:
        """The step's LoRA from a row plan (mixtures, routing): its tables on this device."""
        p = plan.build(self.device)
        table = self.segments(p.seg_lens, p.seg_slots, [slot_rank[s] for s in p.seg_slots], num_slots)
        return LoraStep(self.name, slots, table, p.rows, p.dense, dora, p.mixed)

    def dora(self, tokens: Sequence[int], slots: Sequence[int]) -> DoraTokens:
        """The step's DoRA tokens (token rows, their slots) on this device, in one upload."""
        return DoraTokens.build(tokens, slots, self.device)

    def applier(self, slots: LoraSlots, segments: LoraSegments, dora: DoraTokens | None = None) -> LoraStep:
        """The step's LoRA over the slot pool (a table over tokens), on this backend's kernels."""
        return LoraStep(self.name, slots, segments, dora=dora)


class TorchLora(LoraBackend):
    name = "torch"


class StaticLoraStep:
    """The LoRA of a CUDA-graph decode step (implements the decoder's `LoraApplier`): the Triton
    SGMV kernels over a static segment table (kernels/segments.py `static_segments`) whose
    starts, slots, ranks and tiles are read on the device, so one captured graph serves any mix of
    single (non-DoRA) adapters. Every group runs: which groups the step's adapters adapt is a
    host fact the graph cannot see (slots hold zeros in groups their adapter leaves alone)."""

    def __init__(self, slots: LoraSlots, segments: LoraSegments):
        from kernels import triton_sgmv  # only here: a CPU server never imports triton

        self.kernels = triton_sgmv
        self.slots = slots
        self.segments = segments
        # launch configs fixed once per group (from the table's fixed host values and the pool's shapes)
        self.configs = {}
        for g, offsets in slots.offsets.items():
            a, r = slots.a[g], slots.max_rank  # h and the kernels' rank loops span the padded rank R
            widths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
            self.configs[g] = (triton_sgmv.shrink_config(segments, a.shape[-1], r * len(widths), a.element_size()),
                               triton_sgmv.expand_config(segments, r, widths))

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> None:
        s, k = self.slots, self.kernels
        offsets = s.offsets[group]
        shrink, expand = self.configs[group]
        h = k.sgmv_shrink(x, s.layer_a[group][layer], self.segments, n_slices=len(offsets) - 1, config=shrink,
                          pages=s.pages)
        k.sgmv_expand(y, h, s.layer_b[group][layer], self.segments, offsets, config=expand, pages=s.pages)


class TritonLora(LoraBackend):
    name = "triton"
    PAGE_RANK = 16  # a common adapter rank, and one rank chunk of the expand (one page id per chunk)

    def page_rank(self, max_rank: int, choice: int | None) -> int:
        if choice is not None:
            return choice  # the pool checks that it divides max_rank
        return self.PAGE_RANK if max_rank % self.PAGE_RANK == 0 else max_rank

    @classmethod
    def unavailable(cls, device):
        return triton_unavailable(device, "triton_sgmv")

    def static_step(self, slots: LoraSlots, table: torch.Tensor, size: int) -> StaticLoraStep:
        """The graph-safe LoRA of a decode step of `size` rows over the device table [static_len(size)]."""
        return StaticLoraStep(slots, static_segments(table, size, slots.num_slots))


LORA_BACKENDS: dict[str, type[LoraBackend]] = {b.name: b for b in (TorchLora, TritonLora)}
AUTO_LORA = {"cpu": ("torch",), "cuda": ("triton", "torch")}
