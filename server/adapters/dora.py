"""DoRA's per-output rescale, computed once per load against the base model's weights.

PEFT's DoRA linear (peft/tuners/lora/dora.py, DoraLinearLayer) computes
    y = bias + g * (x @ W.T + s * B @ A @ x),   g = m / ||W + s * B @ A||_row
where the norm is the L2 norm over `in` of each output row of the adapted weight
(`get_weight_norm`: torch.linalg.norm(W + s * BA, dim=1)) and m is the saved
`lora_magnitude_vector` [out]. g depends only on the adapter and W, so it is computed here
in float32 when the adapter is loaded; the runtime applies y = g * y + (1 - g) * bias after
the base linear (bias included) and the LoRA add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType

import torch

from .errors import INCOMPATIBLE, UNSUPPORTED, AdapterError
from .lora_weights import LoraAdapter, LoraModuleWeights

# (layer, PEFT module name) -> the base model's weight W [out, in] of that linear (any dtype/device).
BaseWeight = Callable[[int, str], torch.Tensor]


def dora_scale(base: torch.Tensor, w: LoraModuleWeights) -> torch.Tensor:
    """g = m / ||W + s * B @ A||_row [out] float32 on the CPU, for base W [out, in] and DoRA module `w`.
    Computed on W's device (no copy of W to the host)."""
    assert w.magnitude is not None
    device = base.device
    adapted = base.to(torch.float32) + w.scale * (w.b.to(device) @ w.a.to(device))
    norm = torch.linalg.norm(adapted, dim=1)
    return (w.magnitude.to(device) / norm).cpu()


def with_dora_scales(adapter: LoraAdapter, base_weight: BaseWeight | None) -> LoraAdapter:
    """`adapter` with every module's `dora_scale` computed (DoRA), or `adapter` itself (plain LoRA).

    AdapterError: adapter_unsupported if it is DoRA and the base weights are not available
    (`base_weight` None); adapter_incompatible if a row of W + s * B @ A has norm 0 or the
    result is not finite (PEFT would divide by zero)."""
    if not adapter.use_dora:
        return adapter
    if base_weight is None:
        raise AdapterError(UNSUPPORTED, "DoRA adapters need the base model's weights, which this adapter "
                                        "manager was not given")
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    with torch.no_grad():
        for (layer, module), w in adapter.modules.items():
            g = dora_scale(base_weight(layer, module), w)
            if not torch.isfinite(g).all():
                bad = int((~torch.isfinite(g)).sum())
                raise AdapterError(INCOMPATIBLE, f"layer {layer} {module}: DoRA rescale m / ||W + s*B@A|| is not "
                                                 f"finite in {bad} rows (a zero-norm row of the adapted base weight)")
            modules[(layer, module)] = replace(w, dora_scale=g)
    nbytes = sum(w.nbytes for w in modules.values())
    return replace(adapter, modules=MappingProxyType(modules), nbytes=nbytes)
