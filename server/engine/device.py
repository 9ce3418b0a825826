"""Which device and dtype the engine runs on, from the config's names."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32 —
    on AVX2-only CPUs bf16 GEMMs are emulated and ~4x slower than fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if fast_bf16 else torch.float32
    table = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # what the tests compare with transformers
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: use auto, bfloat16 or float32")
    return table[name]
