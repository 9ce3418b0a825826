"""The runtime adapter: validated LoRA weights in host memory, in the layout the device slots copy.

Produced by a file parser (peft_format.py for PEFT directories) and consumed by the host
cache and the device slots; it knows nothing of files, names or owners.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LoraModuleWeights:
    """One adapted linear: delta(x) = scale * (x @ a.T) @ b.T, [tokens, out] for x [tokens, in]."""

    a: torch.Tensor  # [r, in]  float32, contiguous (PEFT lora_A.weight)
    b: torch.Tensor  # [out, r] float32, contiguous (PEFT lora_B.weight; scale NOT folded in)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module patterns applied)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated adapter's weights, all float32 in host memory."""

    modules: Mapping[tuple[int, str], LoraModuleWeights]  # (layer index, "q_proj"...) -> weights
    target_modules: tuple[str, ...]  # projections present, in the model's lora_targets order
    rank: int  # max rank over modules
    num_params: int  # elements of all A and B
    nbytes: int  # fp32 bytes of all A and B
