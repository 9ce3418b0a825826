"""Host tensors onto a GPU in one copy.

A slot write is many small pieces (an adapter on every projection of an 8B model: ~450 page
slices of A and B, a DoRA row per module, prototypes), and each copy from pageable host memory
makes the host wait for everything queued on the stream. Packed into one pinned buffer, the
pieces go up in one asynchronous copy and are scattered by device-side copies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.upload import to_device


def stage(tensors: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """`tensors` (on the host, any shapes) as views, in order and shape, of one `dtype` tensor on
    `device` that a single non-blocking copy from pinned memory filled; values cast to `dtype`.
    Off CUDA the tensors themselves: nothing to move."""
    if device.type != "cuda" or not tensors:
        return list(tensors)
    sizes = [t.numel() for t in tensors]
    host = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
    torch.cat([t.reshape(-1).to(dtype) for t in tensors], out=host)
    flat = to_device(host, device)
    return [piece.view(t.shape) for piece, t in zip(flat.split(sizes), tensors)]


def copy_into(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """dst.copy_(src) for each pair (same shapes; values cast to each dst's dtype), one multi-tensor
    copy per destination dtype: torch's CUDA `_foreach_copy_` runs all-dense lists in one fused
    kernel that, before pytorch/pytorch#173531 (2026-01), wrote every destination as the FIRST one's
    dtype (a bool flag row got bf16 bytes, and bytes past its end)."""
    groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for dst, src in zip(dsts, srcs, strict=True):
        to, of = groups.setdefault(dst.dtype, ([], []))
        to.append(dst)
        of.append(src)
    for to, of in groups.values():
        torch._foreach_copy_(to, of)
