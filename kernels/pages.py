"""Rank-unit pages: the paged LoRA pool's layout, checked, and its dense per-slot view.

A paged pool stores every adapter in pages of u rank rows (S-LoRA's unified paging), so an
adapter of rank r takes ceil(r/u) pages anywhere in the pool instead of a rank-R slot:
  a [P, n_slices*u, in]    page p holds u rank rows of every fused slice (slice i: rows i*u..)
  b [P, out_total, u]      the same u rank columns of B (slices concatenated along out)
  pages [N, R//u] int32    slot s's pages in rank order; R = u * pages.shape[1]
Rank row r of slice i of slot s lives in page p = pages[s, r // u]:
  a[p, i*u + r % u] == A_s[i*R + r],   b[p, :, r % u] == B_s[:, r].
Entries of `pages` past an adapter's ceil(rank/u) pages name any valid page (e.g. 0 or another
adapter's) and rows past its rank hold anything (finite), so every consumer masks rank rows >=
the adapter's rank: the SGMV kernels and the reference by the segment's rank, the dense
mixture paths (kernels/mixture.py) by a per-slot rank tensor, multiplying by 0.
Everything here is tensor ops on the device: no host read of `pages`.
"""

from __future__ import annotations

import torch


def check_pages(pages: torch.Tensor, device: torch.device) -> int:
    """Validate a page table for weights on `device`; -> pages per slot (R // u). Host metadata
    only (no read of the table). The caller checks that its slots lie below pages.shape[0]."""
    if pages.dim() != 2 or pages.dtype != torch.int32:
        raise ValueError(f"pages must be int32 [slots, R//u], got {pages.dtype} {tuple(pages.shape)}")
    if pages.device != device:
        raise ValueError(f"pages is on {pages.device}, the weights on {device}")
    if not pages.is_contiguous():
        raise ValueError("pages must be contiguous")
    if pages.shape[1] == 0:
        raise ValueError(f"pages {tuple(pages.shape)} has no page per slot")
    return pages.shape[1]


def slot_a(a: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor | None, n_slices: int) -> torch.Tensor:
    """Dense A of the given slots: slots [S] int (a's device) -> [S, n_slices*R, in].

    a is the slot pool [N, n_slices*R, in] (pages None: a plain gather) or the paged pool
    [P, n_slices*u, in] with pages [N, R//u]. Paged rows past a slot's rank are whatever its
    page-table entries name (see the module docstring): mask them.
    """
    if pages is None:
        return a.index_select(0, slots)
    n_s, n_pg, k = slots.shape[0], pages.shape[1], a.shape[2]
    u = a.shape[1] // n_slices
    w = a.index_select(0, pages.index_select(0, slots).view(-1)).view(n_s, n_pg, n_slices, u, k)
    return w.transpose(1, 2).reshape(n_s, n_slices * n_pg * u, k)  # rows (slice, page, row in page)


def slot_b(b: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor | None) -> torch.Tensor:
    """Dense B of the given slots: slots [S] int -> [S, out_total, R]. b is [N, out_total, R]
    (pages None) or the paged pool [P, out_total, u] with pages [N, R//u]."""
    if pages is None:
        return b.index_select(0, slots)
    n_s, n_pg, out, u = slots.shape[0], pages.shape[1], b.shape[1], b.shape[2]
    w = b.index_select(0, pages.index_select(0, slots).view(-1)).view(n_s, n_pg, out, u)
    return w.permute(0, 2, 1, 3).reshape(n_s, out, n_pg * u)


def slots_b_flat(b: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor | None) -> torch.Tensor:
    """The slots' B side by side, [out_total, S*R] (column s*R + r = B_slots[s][:, r]), in one
    copy: the right operand of a dense expand over S experts."""
    if pages is None:
        return b.index_select(0, slots).permute(1, 0, 2).reshape(b.shape[1], slots.shape[0] * b.shape[2])
    n_s, n_pg, out, u = slots.shape[0], pages.shape[1], b.shape[1], b.shape[2]
    w = b.index_select(0, pages.index_select(0, slots).view(-1)).view(n_s, n_pg, out, u)
    return w.permute(2, 0, 1, 3).reshape(out, n_s * n_pg * u)


def rank_keep(slot_ranks: torch.Tensor, slots: torch.Tensor, r_pad: int) -> torch.Tensor:
    """[S, R] bool: rank row r < the rank of slots[s] (slot_ranks [N] int, per slot)."""
    ranks = slot_ranks.index_select(0, slots)
    return torch.arange(r_pad, device=ranks.device) < ranks.unsqueeze(1)
