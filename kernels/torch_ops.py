"""Pure-torch segmented LoRA ops (the CPU fast path), no Python loop over segments or tokens.

shrink / expand pick, per step table: one segment -> plain GEMMs; a padded layout in the table
  (decode-like steps) -> padded_*; else grouped_* (gather_* where grouped_mm cannot run).
padded_*: gather the tokens into [W, L, in] (W pool slots of the window, L = longest segment)
  and run one torch.bmm against the pool window itself (a view). At decode this measured
  1.3-6.7x faster than grouped_mm, whose per-group host work dominates tiny GEMMs
  (docs/benchmarks.md); the table only offers the layout when padding at most doubles the rows.
grouped_*: torch.nn.functional.grouped_mm with the slot pool itself as the 3D operand and
  LoraSegments.slot_offsets as its per-group END offsets, so no weights are copied per step.
  Only the pool rows between the first and last active slot are passed (empty groups cost a
  call each inside grouped_mm).
Both read the pool window as a view while it is dense; when the step's adapters are spread
  over a large pool (seg.compact) they first gather the S active slots' weights (one
  index_select per operand and call) and run over those S entries only, so the cost follows
  the adapters the step uses, not the pool size. grouped_mm needs every non-unit stride of the last two dims of
  both operands to be a multiple of 16 bytes; when that fails (or this torch has no grouped_mm
  for the device/dtype) we fall back to gather_*.
gather_*: gather each token's weights and contract per token (bmm); copies T x weights, so it
  is only a fallback and a benchmark candidate.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from .segments import LoraSegments


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped_mm kernel for (device, dtype); probed once, tiny."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.ones(4, 8, dtype=dtype, device=device_type)
        b = torch.ones(2, 8, 8, dtype=dtype, device=device_type)
        F.grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _gmm_ok(*ts: torch.Tensor) -> bool:
    if not grouped_mm_available(ts[0].device.type, ts[0].dtype):
        return False
    for t in ts:
        esz = t.element_size()
        if any(st != 1 and (st * esz) % 16 for st in t.stride()[-2:]):
            return False
    return True


def _pool_window(seg: LoraSegments, pool: torch.Tensor) -> tuple[int, int]:
    lo, hi = seg.seg_slots[0], seg.seg_slots[-1] + 1
    if hi > pool.shape[0]:
        raise ValueError(f"slot {hi - 1} is outside the pool of {pool.shape[0]} slots")
    return lo, hi


def _step_weights(seg: LoraSegments, pool: torch.Tensor) -> torch.Tensor:
    """The pool entries the step's kernels run over: the window [first, last active slot] as a
    view, or (seg.compact) the active slots' weights gathered in segment order [S, ...]."""
    lo, hi = _pool_window(seg, pool)
    return pool.index_select(0, seg.slots) if seg.compact else pool[lo:hi]


def _group_ends(seg: LoraSegments) -> torch.Tensor:
    """grouped_mm's END offsets for the entries of _step_weights."""
    if seg.compact:
        return seg.starts[1:]
    lo, hi = seg.seg_slots[0], seg.seg_slots[-1] + 1
    return seg.slot_offsets[lo:hi]


def shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """x [T, in], a [N, n_slices*R, in] -> h [num_tokens, n_slices*R] float32: the fastest path."""
    if seg.pad_rows is not None and seg.num_segments > 1:
        return padded_shrink(x, a, seg)
    return grouped_shrink(x, a, seg)


def expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
           slice_offsets: Sequence[int]) -> None:
    """In place y[:num_tokens, slice i] += h[:, i*R:(i+1)*R] @ b[slot, slice i, :]^T: the fastest path."""
    if seg.pad_rows is not None and seg.num_segments > 1:
        padded_expand(y, h, b, seg, slice_offsets)
    else:
        grouped_expand(y, h, b, seg, slice_offsets)


def padded_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """Padded layout + one bmm. Same contract as grouped_shrink; needs seg.pad_rows."""
    nt = seg.num_tokens
    if nt == 0:
        return x.new_zeros(0, a.shape[1], dtype=torch.float32)
    w = _step_weights(seg, a)
    xs = x if x.dtype == a.dtype else x[:nt].to(a.dtype)
    xp = xs.index_select(0, seg.pad_rows).view(w.shape[0], -1, xs.shape[1])  # [W, L, in]
    hp = torch.bmm(xp, w.transpose(1, 2))  # [W, L, nR]
    return hp.view(-1, a.shape[1]).index_select(0, seg.pad_valid).float()


def padded_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                  slice_offsets: Sequence[int]) -> None:
    """Padded layout + one bmm per fused slice. Same contract as grouped_expand; needs seg.pad_rows."""
    nt = seg.num_tokens
    if nt == 0:
        return
    w = _step_weights(seg, b)
    r_pad = b.shape[2]
    hh = h if h.dtype == b.dtype else h.to(b.dtype)
    hp = hh.index_select(0, seg.pad_rows).view(w.shape[0], -1, hh.shape[1])  # [W, L, n_slices*R]
    for i in range(len(slice_offsets) - 1):  # static: at most 3 fused slices
        lo_o, hi_o = slice_offsets[i], slice_offsets[i + 1]
        d = torch.bmm(hp[:, :, i * r_pad:(i + 1) * r_pad], w[:, lo_o:hi_o].transpose(1, 2))
        y[:nt, lo_o:hi_o] += d.view(-1, hi_o - lo_o).index_select(0, seg.pad_valid).to(y.dtype)


def grouped_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """x [T, in], a [N, n_slices*R, in] -> h [num_tokens, n_slices*R] float32 (all rank rows)."""
    nt = seg.num_tokens
    if nt == 0:
        return x.new_zeros(0, a.shape[1], dtype=torch.float32)
    lo, hi = _pool_window(seg, a)
    xs = x[:nt] if x.dtype == a.dtype else x[:nt].to(a.dtype)
    if seg.num_segments == 1:  # one adapter: a plain GEMM skips grouped_mm's per-group overhead
        return (xs @ a[lo].T).float()
    w = _step_weights(seg, a).transpose(1, 2)  # [G, in, nR]
    if not _gmm_ok(xs, w):
        return gather_shrink(x, a, seg)
    return F.grouped_mm(xs, w, offs=_group_ends(seg)).float()


def grouped_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                   slice_offsets: Sequence[int]) -> None:
    """In place y[:num_tokens, slice i] += h[:, i*R:(i+1)*R] @ b[slot, slice i, :]^T."""
    nt = seg.num_tokens
    if nt == 0:
        return
    lo, hi = _pool_window(seg, b)
    r_pad = b.shape[2]
    hh = h if h.dtype == b.dtype else h.to(b.dtype)
    n_slices = len(slice_offsets) - 1
    hs = [hh[:, i * r_pad:(i + 1) * r_pad] for i in range(n_slices)]
    if seg.num_segments == 1:
        for i in range(n_slices):  # static: at most 3 fused slices
            lo_o, hi_o = slice_offsets[i], slice_offsets[i + 1]
            if y.dtype == b.dtype:  # accumulate inside the GEMM: no temporary, ~2x faster here
                y[:nt, lo_o:hi_o].addmm_(hs[i], b[lo, lo_o:hi_o].T)
            else:
                y[:nt, lo_o:hi_o] += (hs[i] @ b[lo, lo_o:hi_o].T).to(y.dtype)
        return
    wb = _step_weights(seg, b)
    ws = [wb[:, slice_offsets[i]:slice_offsets[i + 1]].transpose(1, 2) for i in range(n_slices)]
    if not _gmm_ok(*ws, *hs):
        gather_expand(y, h, b, seg, slice_offsets)
        return
    offs = _group_ends(seg)
    for i in range(n_slices):  # static: at most 3 fused slices
        d = F.grouped_mm(hs[i], ws[i], offs=offs)
        y[:nt, slice_offsets[i]:slice_offsets[i + 1]] += d.to(y.dtype)


def gather_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments) -> torch.Tensor:
    """Per-token gather + bmm. Same contract as grouped_shrink."""
    nt = seg.num_tokens
    if nt == 0:
        return x.new_zeros(0, a.shape[1], dtype=torch.float32)
    w = a.index_select(0, seg.token_slots)  # [nt, nR, in]
    xs = x[:nt].to(a.dtype).unsqueeze(2)  # [nt, in, 1]
    return torch.bmm(w, xs).squeeze(2).float()


def gather_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                  slice_offsets: Sequence[int]) -> None:
    """Per-token gather + bmm. Same contract as grouped_expand."""
    nt = seg.num_tokens
    if nt == 0:
        return
    r_pad = b.shape[2]
    w = b.index_select(0, seg.token_slots)  # [nt, out_total, R]
    hh = h.to(b.dtype)
    for i in range(len(slice_offsets) - 1):  # static: at most 3 fused slices
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        d = torch.bmm(w[:, lo:hi], hh[:, i * r_pad:(i + 1) * r_pad].unsqueeze(2)).squeeze(2)
        y[:nt, lo:hi] += d.to(y.dtype)
