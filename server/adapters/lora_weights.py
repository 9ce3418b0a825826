"""The runtime adapter: validated LoRA weights in host memory, in the layout the device slots copy.

Produced by a file parser (peft_format.py for PEFT directories) and consumed by the host
cache and the device slots; it knows nothing of files, names or owners. Besides the file's
tensors it carries what is derived from them once per load: each module's routing prototype
(prototypes.py) and, for DoRA, the per-output rescale against the base weights (dora.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LoraModuleWeights:
    """One adapted linear: delta(x) = scale * (x @ a.T) @ b.T, [tokens, out] for x [tokens, in].

    DoRA (PEFT use_dora): y = g * (x @ W.T + delta(x)) + bias, g = dora_scale."""

    a: torch.Tensor  # [r, in]  float32, contiguous (PEFT lora_A.weight)
    b: torch.Tensor  # [out, r] float32, contiguous (PEFT lora_B.weight; scale NOT folded in)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module patterns applied)
    prototype: torch.Tensor  # [in] float32: top right singular vector of b @ a (unit; zero if b @ a == 0)
    magnitude: torch.Tensor | None = None  # [out] float32: DoRA's m (PEFT lora_magnitude_vector); None: plain
    dora_scale: torch.Tensor | None = None  # [out] float32: m / ||W + scale * b @ a||_row, once W is known

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        """Host bytes of every tensor held (file tensors and derived ones)."""
        tensors = (self.a, self.b, self.prototype, self.magnitude, self.dora_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A validated adapter's weights, all float32 in host memory."""

    modules: Mapping[tuple[int, str], LoraModuleWeights]  # (layer index, "q_proj"...) -> weights
    target_modules: tuple[str, ...]  # projections present, in the model's lora_targets order
    rank: int  # max rank over modules
    num_params: int  # elements of the file's tensors: all A and B (and DoRA magnitudes)
    nbytes: int  # host bytes of all modules' tensors, derived ones included (LoraModuleWeights.nbytes)
    use_dora: bool = False  # every module has a magnitude (and, once prepared, a dora_scale)

    @property
    def dora_ready(self) -> bool:
        """Whether the slots may take it: plain LoRA, or DoRA with every module's dora_scale computed."""
        return not self.use_dora or all(w.dora_scale is not None for w in self.modules.values())
