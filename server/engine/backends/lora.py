"""LoRA backends: picked once at engine start; each builds only its kernels' segment layout.

  torch   any device: kernels/torch_ops.py (padded bmm at decode-like steps, grouped_mm over
          the slot pool otherwise): the CPU path.
  triton  CUDA: the Triton SGMV kernels (kernels/triton_sgmv.py) over BLOCK_M tile tables.
          On CPU only under Triton's interpreter (tests).
"""

from __future__ import annotations

from abc import ABC
from typing import ClassVar, Sequence

import torch

from kernels import LoraSegments, add_lora
from server.adapters.slots import LoraSlots

from .availability import triton_unavailable


class LoraStep:
    """One step's LoRA (implements the decoder's `LoraApplier`): the segment table + the pool."""

    def __init__(self, kernel: str, slots: LoraSlots, segments: LoraSegments):
        self.kernel = kernel
        self.slots = slots
        self.segments = segments

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.slots
        add_lora(y, x, s.layer_a[module][layer], s.layer_b[module][layer], self.segments, s.offsets[module],
                 backend=self.kernel)


class LoraBackend(ABC):
    name: ClassVar[str]

    def __init__(self, device: torch.device):
        self.device = device

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this backend cannot run here, or None. Called before construction."""
        return None

    def segments(self, seg_lens: Sequence[int], seg_slots: Sequence[int], seg_ranks: Sequence[int],
                 num_slots: int) -> LoraSegments:
        """The step's segment table from the runner's host lists (tokens, slot and rank per segment,
        ascending slots), with this backend's kernel layout only, in one upload."""
        return LoraSegments.build(seg_lens, seg_slots, seg_ranks, num_slots, self.device, layouts=(self.name,))

    def applier(self, slots: LoraSlots, segments: LoraSegments) -> LoraStep:
        """The step's LoRA over the slot pool, on this backend's kernels."""
        return LoraStep(self.name, slots, segments)


class TorchLora(LoraBackend):
    name = "torch"


class TritonLora(LoraBackend):
    name = "triton"

    @classmethod
    def unavailable(cls, device):
        return triton_unavailable(device, "triton_sgmv")


LORA_BACKENDS: dict[str, type[LoraBackend]] = {b.name: b for b in (TorchLora, TritonLora)}
AUTO_LORA = {"cpu": ("torch",), "cuda": ("triton", "torch")}
