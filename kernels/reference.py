"""Slow, obvious per-segment torch loops: the oracle the fast paths are tested against.

Semantics the fast paths must match:
  * only rows [0, num_tokens) of y are touched; h has exactly num_tokens rows;
  * segment i uses pool row seg_slots[i] and only its first seg_ranks[i] rank columns of
    every slice; h columns at padded ranks are exactly 0;
  * math in float32 on float32 copies of the operands, except that expand rounds h to the
    dtype of b first, as the fast paths feed the matrix units in the weights' dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .segments import LoraSegments


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments,
                    n_slices: int | None = None) -> torch.Tensor:
    """x [T, in], a [N, n_slices*R, in] -> h [num_tokens, n_slices*R] float32.

    Without n_slices the padded rank R is unknown, so every row of a is used (equal to the
    rank-limited result when the padding is zero, as the pool contract requires).
    """
    nr = a.shape[1]
    skip_pad = n_slices is not None
    n_slices = n_slices or 1
    r_pad = nr // n_slices
    h = torch.zeros(seg.num_tokens, nr, dtype=torch.float32, device=x.device)
    for i in range(seg.num_segments):
        s, e = seg.seg_starts[i], seg.seg_starts[i + 1]
        slot = seg.seg_slots[i]
        rank = min(seg.seg_ranks[i], r_pad) if skip_pad else r_pad
        xs = x[s:e].float()
        for j in range(n_slices):
            w = a[slot, j * r_pad: j * r_pad + rank].float()  # [rank, in]
            h[s:e, j * r_pad: j * r_pad + rank] = xs @ w.T
    return h


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                    slice_offsets: Sequence[int]) -> None:
    """In place y[:num_tokens, off[j]:off[j+1]] += h[:, j*R:j*R+rank] @ b[slot, off[j]:off[j+1], :rank]^T."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    for i in range(seg.num_segments):
        s, e = seg.seg_starts[i], seg.seg_starts[i + 1]
        slot, rank = seg.seg_slots[i], seg.seg_ranks[i]
        for j in range(n_slices):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            hs = h[s:e, j * r_pad: j * r_pad + rank].to(b.dtype).float()
            w = b[slot, lo:hi, :rank].float()  # [width, rank]
            y[s:e, lo:hi] = (y[s:e, lo:hi].float() + hs @ w.T).to(y.dtype)


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 seg: LoraSegments, slice_offsets: Sequence[int]) -> None:
    """y += shrink then expand, per segment (see module docstring)."""
    n_slices = len(slice_offsets) - 1
    h = lora_shrink_ref(x, a, seg, n_slices)
    lora_expand_ref(y, h, b, seg, slice_offsets)


def add_lora_dense(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   seg: LoraSegments, slice_offsets: Sequence[int]) -> None:
    """Independent formulation, used only to check the oracle: gather each token's weights,
    mask padded ranks, and contract with one float64 einsum (no segment loop)."""
    n_slices = len(slice_offsets) - 1
    r_pad = b.shape[2]
    nt = seg.num_tokens
    if nt == 0:
        return
    lens = torch.diff(torch.tensor(seg.seg_starts))
    tok_slot = torch.repeat_interleave(torch.tensor(seg.seg_slots), lens).to(x.device)
    tok_rank = torch.repeat_interleave(torch.tensor(seg.seg_ranks), lens).to(x.device)
    keep = (torch.arange(r_pad, device=x.device)[None, :] < tok_rank[:, None]).double()  # [nt, R]
    ag = a[tok_slot].double().view(nt, n_slices, r_pad, -1) * keep[:, None, :, None]
    h = torch.einsum("tk,tsrk->tsr", x[:nt].double(), ag)  # [nt, n_slices, R]
    h = h.to(torch.float32).to(b.dtype).double()
    bg = b[tok_slot].double() * keep[:, None, :]  # [nt, out_total, R]
    for j in range(n_slices):
        lo, hi = slice_offsets[j], slice_offsets[j + 1]
        d = torch.einsum("tr,tor->to", h[:, j], bg[:, lo:hi])
        y[:nt, lo:hi] = (y[:nt, lo:hi].double() + d).to(y.dtype)
