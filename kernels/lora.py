"""Public segmented LoRA ops: one entry point per op over the three kernel families.

`backend=` names the path: "reference" (per-segment loop), "torch" (torch_ops: padded bmm at
decode-like steps, grouped_mm over the slot pool otherwise, gather fallback; the fastest
correct CPU paths measured by loadtest/bench_kernels.py, see docs/benchmarks_kernels.md),
"triton" (triton_sgmv; on CPU tensors this runs Triton's interpreter: tiny shapes only).
The server's LoRA backend (server/engine/backends/) names it once, at start; None (tests,
benchmarks) means triton for CUDA tensors and torch otherwise. The segment table must carry
the chosen kernel's layout (LoraSegments.build(layouts=...)).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import reference, torch_ops
from .pages import check_pages, slot_a, slot_b
from .segments import LoraSegments

BACKENDS = ("reference", "torch", "triton")


def _backend(t: torch.Tensor, backend: str | None, paged: bool = False) -> str:
    if backend is None:
        backend = "triton" if t.device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if paged and backend == "torch":
        raise ValueError("the torch LoRA kernels run over an unpaged slot pool only (pages=None); "
                         "paged weights need backend 'triton' or 'reference'")
    return backend


def _layout(seg: LoraSegments, which: str) -> None:
    if which != "reference":  # the reference loop reads only the host tuples
        seg.require(which)


def _check(seg: LoraSegments, num_slots: int, r_pad: int) -> None:
    if seg.max_rank > r_pad:
        raise ValueError(f"segment rank {seg.max_rank} exceeds the pool's padded rank {r_pad}")
    if seg.seg_slots and seg.seg_slots[-1] >= num_slots:
        raise ValueError(f"slot {seg.seg_slots[-1]} is outside the pool of {num_slots} slots")


def _every_slot(pages: torch.Tensor) -> torch.Tensor:
    return torch.arange(pages.shape[0], device=pages.device)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments,
                n_slices: int | None = None, backend: str | None = None,
                out: torch.Tensor | None = None, pages: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] (T >= seg.num_tokens; fp32/bf16), a [N, n_slices*R, in] (per-slot stacked A of
    each fused slice, zero-padded to rank R; fp32/bf16) -> h [seg.num_tokens, n_slices*R] float32.

    n_slices (optional) tells the kernels where each slice's padded rank starts so the GPU path
    skips reading padded rows; results are equal either way when the padding is zero.
    out (optional): a float32 [num_tokens, n_slices*R] buffer that receives h and is returned.
    pages (optional): a paged pool (kernels/pages.py): a [P, n_slices*u, in], pages [N, R//u]
    int32 on a's device; n_slices is then required, h is still [num_tokens, n_slices*R] and
    rank rows past each segment's rank are never read. Backends "triton" and "reference" only.
    """
    if x.dim() != 2 or a.dim() != 3 or x.shape[1] != a.shape[2]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, a {tuple(a.shape)}")
    if x.shape[0] < seg.num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows < num_tokens {seg.num_tokens}")
    which = _backend(x, backend, paged=pages is not None)
    if pages is None:
        num_slots, r_pad = a.shape[0], a.shape[1] // (n_slices or 1)
    else:
        if not n_slices or a.shape[1] % n_slices:
            raise ValueError(f"paged A [P, n_slices*u, in] {tuple(a.shape)} needs n_slices dividing its rows, "
                             f"got n_slices={n_slices}")
        num_slots = pages.shape[0]
        r_pad = a.shape[1] // n_slices * check_pages(pages, a.device)
    _check(seg, num_slots, r_pad)
    nr = a.shape[1] if pages is None else n_slices * r_pad  # h's width
    if out is not None and (out.shape != (seg.num_tokens, nr) or out.dtype != torch.float32):
        raise ValueError(f"out must be float32 [{seg.num_tokens}, {nr}], "
                         f"got {out.dtype} {tuple(out.shape)}")
    _layout(seg, which)
    if which == "triton":
        from . import triton_sgmv  # imported lazily: CPU-only deployments never load Triton
        return triton_sgmv.sgmv_shrink(x, a, seg, n_slices, out=out, pages=pages)
    if which == "torch":
        h = torch_ops.shrink(x, a, seg)
    else:
        dense = a if pages is None else slot_a(a, _every_slot(pages), pages, n_slices)
        h = reference.lora_shrink_ref(x, dense, seg, n_slices)
    if out is None:
        return h
    out.copy_(h)
    return out


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                slice_offsets: Sequence[int], backend: str | None = None,
                pages: torch.Tensor | None = None) -> None:
    """In place: for each slice i,
    y[:num_tokens, off[i]:off[i+1]] += h[:, i*R:(i+1)*R] @ b[slot, off[i]:off[i+1], :]^T.

    y [T, out_total] (model dtype, fp32/bf16), h [num_tokens, n_slices*R] float32,
    b [N, out_total, R] (slices concatenated along out, zero-padded to rank R; fp32/bf16),
    slice_offsets = (0, out_0, out_0+out_1, ..., out_total), 1 to 3 slices.
    Rows >= num_tokens of y are never touched.
    pages (optional): a paged pool (kernels/pages.py): b [P, out_total, u], pages [N, R//u]
    int32 on b's device (R = u * pages.shape[1]); h keeps its [num_tokens, n_slices*R] layout.
    Backends "triton" and "reference" only.
    """
    n_slices = len(slice_offsets) - 1
    if b.dim() != 3 or slice_offsets[-1] != b.shape[1] or y.shape[1] != b.shape[1]:
        raise ValueError(f"shape mismatch: y {tuple(y.shape)}, b {tuple(b.shape)}, "
                         f"offsets {tuple(slice_offsets)}")
    which = _backend(y, backend, paged=pages is not None)
    if pages is None:
        num_slots, r_pad = b.shape[0], b.shape[2]
    else:
        num_slots = pages.shape[0]
        r_pad = b.shape[2] * check_pages(pages, b.device)
    if h.shape != (seg.num_tokens, n_slices * r_pad):
        raise ValueError(f"h must be [{seg.num_tokens}, {n_slices * r_pad}], got {tuple(h.shape)}")
    _check(seg, num_slots, r_pad)
    _layout(seg, which)
    if which == "triton":
        from . import triton_sgmv
        triton_sgmv.sgmv_expand(y, h, b, seg, slice_offsets, pages=pages)
    elif which == "torch":
        torch_ops.expand(y, h, b, seg, slice_offsets)
    else:
        dense = b if pages is None else slot_b(b, _every_slot(pages), pages)
        reference.lora_expand_ref(y, h, dense, seg, slice_offsets)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             seg: LoraSegments, slice_offsets: Sequence[int], backend: str | None = None,
             pages: torch.Tensor | None = None) -> None:
    """y += delta: shrink then expand (the op every LoRA-targeted linear calls).

    y [T, out_total], x [T, in] (same dtype, fp32/bf16), a [N, n_slices*R, in],
    b [N, out_total, R], or paged: a [P, n_slices*u, in], b [P, out_total, u], pages [N, R//u]
    int32; see lora_shrink / lora_expand. No-op for an empty table.
    """
    if seg.num_tokens == 0:
        return
    n_slices = len(slice_offsets) - 1
    h = lora_shrink(x, a, seg, n_slices=n_slices, backend=backend, pages=pages)
    lora_expand(y, h, b, seg, slice_offsets, backend=backend, pages=pages)
