"""Triton SGMV kernels: segmented shrink (x @ A^T) and expand (y += h @ B^T) over a slot pool.

Both kernels walk a prebuilt tile table (LoraSegments.tile_range): one program per
(BLOCK_M-token tile of one segment) x (column block) [x K split], so the grid holds no idle
programs however ragged the segments are. Every tile belongs to one segment, so one slot's
weights serve the whole tile and the product runs on the matrix units.

When the shrink splits K (decode-like batches, R <= 16, long K) partial sums meet through fp32
atomics, so h is not bitwise reproducible run to run (differences at rounding level).

CPU tensors need Triton's interpreter (slow; tests at tiny shapes): TRITON_INTERPRET=1 must be
in the environment before triton is first imported (tests/test_kernels.py arranges this).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .pages import check_pages
from .segments import LoraSegments
from .triton_jit import jit


def _sgmv_shrink(
    x_ptr, a_ptr, h_ptr, tiles_ptr, starts_ptr, slots_ptr, ranks_ptr, pages_ptr,
    K, NR, R_PAD, U,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_hm, stride_hn, stride_pg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, SKIP_PAD: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
):
    # h[m, n] (+)= sum_k x[m, k] * a[slot, n, k] over this program's K range
    # (PAGED: a[pages[slot, r // U], i*U + r % U, k] for n = i*R_PAD + r).
    pid_n = tl.program_id(0)  # column block fastest: programs sharing an x tile run together
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg = tl.load(tiles_ptr + 2 * pid_t)
    m0 = tl.load(tiles_ptr + 2 * pid_t + 1)
    m_end = tl.load(starts_ptr + seg + 1)
    slot = tl.load(slots_ptr + seg).to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m_end
    n_in = offs_n < NR
    n_load = n_in
    if SKIP_PAD:
        # rows past this adapter's rank are zero padding: don't fetch them
        rank = tl.load(ranks_ptr + seg)
        n_load = n_in & ((offs_n % R_PAD) < rank)

    k_span = ((K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K)) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)
    x_ptrs = (x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
              + (k_lo + offs_k)[None, :] * stride_xk)
    if PAGED:
        # each row of the tile from its own page; rows past the rank are masked (SKIP_PAD)
        r = offs_n % R_PAD
        page = tl.load(pages_ptr + slot * stride_pg + r // U, mask=n_in, other=0).to(tl.int64)
        a_rows = page * stride_an + ((offs_n // R_PAD) * U + r % U).to(tl.int64) * stride_ar
        a_ptrs = a_ptr + a_rows[:, None] + (k_lo + offs_k)[None, :] * stride_ak
    else:
        a_ptrs = (a_ptr + slot * stride_an + offs_n.to(tl.int64)[:, None] * stride_ar
                  + (k_lo + offs_k)[None, :] * stride_ak)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=n_load[:, None], other=0.0)
        else:
            k_ok = (k + offs_k) < k_hi
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=n_load[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt.to(at.dtype), tl.trans(at), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    out_mask = m_mask[:, None] & n_in[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=out_mask)


def _sgmv_expand(
    y_ptr, h_ptr, b_ptr, tiles_ptr, starts_ptr, slots_ptr, ranks_ptr, pages_ptr,
    R_PAD, U, OFF1, OFF2, OFF3, NT1, NT2,
    stride_ym, stride_yn, stride_hm, stride_hn, stride_bn, stride_bo, stride_br, stride_pg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr, ONE_PAGE: tl.constexpr,
):
    # y[m, o] += sum_r h[m, s*R + r] * b[slot, o, r] for the slice s that holds column o
    # (PAGED: b[pages[slot, r // U], o, r % U]).
    pid_n = tl.program_id(0)  # column tiles of all slices, back to back
    pid_t = tl.program_id(1)
    seg = tl.load(tiles_ptr + 2 * pid_t)
    m0 = tl.load(tiles_ptr + 2 * pid_t + 1)
    m_end = tl.load(starts_ptr + seg + 1)
    slot = tl.load(slots_ptr + seg).to(tl.int64)

    # which slice this column tile lies in: slice s owns column tiles [NT(s), NT(s+1));
    # unused slices get NT = number of tiles, so their test is never true
    in1 = pid_n >= NT1
    in2 = pid_n >= NT2
    sl = in1.to(tl.int32) + in2.to(tl.int32)
    col_lo = tl.where(in2, OFF2, tl.where(in1, OFF1, 0))
    col_hi = tl.where(in2, OFF3, tl.where(in1, OFF2, OFF1))
    first_tile = tl.where(in2, NT2, tl.where(in1, NT1, 0))

    # only the adapter's true rank columns carry data: fewer B bytes for small ranks (and a paged
    # pool's pages past the rank name any page)
    k_hi = tl.minimum(tl.load(ranks_ptr + seg), R_PAD)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = col_lo + (pid_n - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m_end
    n_mask = offs_n < col_hi
    h_ptrs = (h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
              + (sl * R_PAD + offs_k)[None, :] * stride_hn)
    if PAGED:
        # the page and the column in it are added per rank chunk (pages may lie anywhere)
        pg_ptr = pages_ptr + slot * stride_pg
        b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bo
    else:
        b_ptrs = (b_ptr + slot * stride_bn + offs_n.to(tl.int64)[:, None] * stride_bo
                  + offs_k[None, :] * stride_br)
    # y is the bulk of the traffic: issue its load before the (short) rank loop
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_hi, BLOCK_K):
        k_ok = (k + offs_k) < k_hi
        ht = tl.load(h_ptrs, mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        if PAGED and ONE_PAGE:  # BLOCK_K divides U: the chunk is in one page, its columns contiguous
            page = tl.load(pg_ptr + k // U).to(tl.int64)
            bt = tl.load(b_ptrs + page * stride_bn + ((k % U) + offs_k)[None, :] * stride_br,
                         mask=n_mask[:, None] & k_ok[None, :], other=0.0)
        elif PAGED:
            r = k + offs_k
            page = tl.load(pg_ptr + r // U, mask=k_ok, other=0).to(tl.int64)
            bt = tl.load(b_ptrs + (page * stride_bn + (r % U) * stride_br)[None, :],
                         mask=n_mask[:, None] & k_ok[None, :], other=0.0)
        else:
            bt = tl.load(b_ptrs, mask=n_mask[:, None] & k_ok[None, :], other=0.0)
        # h is rounded to the weights' dtype so bf16 weights use the bf16 matrix path
        ht = ht.to(bt.dtype)
        if DOT_FP32:
            ht = ht.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(ht, tl.trans(bt), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hn
        if not PAGED:
            b_ptrs += BLOCK_K * stride_br

    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=y_mask)


# The segment table's views (starts, slots, ranks, tiles) lie at offsets of one upload buffer that
# move with the step's segment count (kernels/triton_jit.py); they are read a scalar at a time.
_TABLE_PTRS = ("tiles_ptr", "starts_ptr", "slots_ptr", "ranks_ptr", "pages_ptr")
_shrink_jit = jit(_sgmv_shrink, pointers=_TABLE_PTRS)
_expand_jit = jit(_sgmv_expand, pointers=_TABLE_PTRS)
# True when triton was imported with TRITON_INTERPRET=1: kernels then run on CPU tensors too.
# The interpreter's 16-bit tl.dot returns garbage (seen with triton 3.9), so there the
# operands are widened to fp32 first (DOT_FP32); compiled kernels keep the bf16 matrix path.
INTERPRETED = type(_shrink_jit).__name__ == "InterpretedFunction"


def _kernel(which: str, device: torch.device):
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "triton is first imported")
    return _shrink_jit if which == "shrink" else _expand_jit


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 weights: exact fp32 products (LoRA is memory-bound, fp32 serving is for parity);
    # 16-bit weights ignore this setting, except in the interpreter, which widens them to fp32.
    return "ieee" if dtype == torch.float32 or INTERPRETED else "tf32"


def shrink_config(seg: LoraSegments, k: int, nr: int, elt_bytes: int) -> dict:
    """Launch parameters for the shrink (host arithmetic only). Fitted to an H100 sweep
    (loadtest/bench_kernels.py --sweep; docs/benchmarks_kernels.md): split-K pays only while
    h is small and K long (decode-like batches, R <= 16); otherwise its atomics and the
    zero-fill cost more than the extra parallelism brings. elt_bytes: widest of x and a."""
    mean = seg.num_tokens / max(seg.num_segments, 1)
    bm = 16 if mean <= 32 else 64
    bn = min(_pow2(nr), 64)
    if nr > 64 or seg.num_tokens >= 2048 or k < 2048:
        split = 1
    else:
        split = 4 if k <= 4096 else 8
    if elt_bytes <= 2:
        bk, stages = (128 if k >= 2048 else 64), 5
    else:  # fp32 tiles: keep 3 stages of (BM + BN) x 64 x 4 bytes in shared memory
        bk, stages = 64, 3
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                num_warps=4, num_stages=stages)


def expand_config(seg: LoraSegments, r_pad: int, widths: Sequence[int]) -> dict:
    """Launch parameters for the expand (host arithmetic only; same sweep). The expand is
    bound by reading + writing y, so tiles are wide (BLOCK_N 128) and rank chunks short."""
    mean = seg.num_tokens / max(seg.num_segments, 1)
    bm = 16 if mean <= 16 else 32 if mean <= 32 else 64
    bn = 128 if max(widths) >= 1024 else 64
    if r_pad >= 32:
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, num_warps=4, num_stages=2)


def _paged(pages: torch.Tensor | None, u: int, device: torch.device, seg: LoraSegments) -> tuple:
    """(padded rank R, the kernel's pages, U and page-table stride arguments); unpaged:
    (None, a dummy pointer, 1, 0): constants, so the kernel keeps one specialisation."""
    if pages is None:
        return None, seg.slots, 1, 0
    return u * check_pages(pages, device), pages, u, pages.stride(0)


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoraSegments, n_slices: int | None = None,
                out: torch.Tensor | None = None, config: dict | None = None,
                pages: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] (fp32/bf16/fp16), a [N, n_slices*R, in] -> h [num_tokens, n_slices*R] float32.

    With n_slices given, rows of a past each segment's rank are not read (h gets 0 there).
    out: optional fp32 [num_tokens, n_slices*R] buffer to write h into (every element is set).
    pages: a paged pool (kernels/pages.py): a [P, n_slices*u, in], pages [N, R//u] int32 on a's
    device, n_slices required; h as above with R = u * pages.shape[1]. The table is read on the
    device only (CUDA-graph safe). config: shrink_config(seg, in, n_slices*R, ...).
    Any strides work; a unit stride on the last dim of x and a is what makes it fast.
    """
    nt, k = seg.num_tokens, a.shape[2]
    if pages is not None and not n_slices:
        raise ValueError("a paged shrink needs n_slices")
    u = a.shape[1] // n_slices if n_slices else 1
    paged_r, pg, u, stride_pg = _paged(pages, u, a.device, seg)
    # SKIP_PAD whenever the slices are known, whatever this step's ranks: a flag that followed
    # min_rank would compile a second variant of the kernel (the mask costs one scalar load)
    if paged_r is None:
        nr = a.shape[1]
        skip = n_slices is not None
        r_pad = nr // n_slices if n_slices else nr
    else:  # rows past a segment's rank may name another adapter's page: always masked
        r_pad, nr = paged_r, n_slices * paged_r
        skip = True
    cfg = dict(config or shrink_config(seg, k, nr, max(x.element_size(), a.element_size())))
    launch = {w: cfg.pop(w) for w in ("num_warps", "num_stages") if w in cfg}
    split = cfg["SPLIT_K"]
    if out is None:
        h = torch.empty(nt, nr, dtype=torch.float32, device=x.device)
    else:
        if out.shape != (nt, nr) or out.dtype != torch.float32:
            raise ValueError(f"out must be float32 [{nt}, {nr}], got {out.dtype} {tuple(out.shape)}")
        h = out
    if split > 1:
        h.zero_()  # split-K partial sums are added atomically
    if nt == 0:
        return h
    tiles, n_tiles = seg.tile_range(cfg["BLOCK_M"])
    grid = (triton.cdiv(nr, cfg["BLOCK_N"]), n_tiles, split)
    even_k = k % (split * cfg["BLOCK_K"]) == 0
    if x.device.type == "cpu":
        launch = {}
    _kernel("shrink", x.device)[grid](
        x, a, h, tiles, seg.starts, seg.slots, seg.ranks, pg,
        k, nr, r_pad, u,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1), stride_pg,
        EVEN_K=even_k, SKIP_PAD=skip, PRECISION=_precision(a.dtype), DOT_FP32=INTERPRETED,
        PAGED=pages is not None, **cfg, **launch)
    return h


def sgmv_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, seg: LoraSegments,
                slice_offsets: Sequence[int], config: dict | None = None,
                pages: torch.Tensor | None = None) -> None:
    """In place, per slice i: y[:num_tokens, off[i]:off[i+1]] +=
    h[:, i*R:i*R+rank] @ b[slot, off[i]:off[i+1], :rank]^T.

    y [T, out_total] (fp32/bf16/fp16), h [num_tokens, n_slices*R] fp32, b [N, out_total, R];
    1 to 3 slices, all in one launch. pages: a paged pool (kernels/pages.py): b [P, out_total, u],
    pages [N, R//u] int32 on b's device, R = u * pages.shape[1], read on the device only.
    config: expand_config(seg, R, widths).
    """
    n_slices = len(slice_offsets) - 1
    if not 1 <= n_slices <= 3 or slice_offsets[0] != 0:
        raise ValueError(f"expected 1..3 slices starting at 0, got offsets {slice_offsets}")
    if seg.num_tokens == 0:
        return
    paged_r, pg, u, stride_pg = _paged(pages, b.shape[2], b.device, seg)
    r_pad = b.shape[2] if paged_r is None else paged_r
    widths = [slice_offsets[i + 1] - slice_offsets[i] for i in range(n_slices)]
    cfg = dict(config or expand_config(seg, r_pad, widths))
    launch = {w: cfg.pop(w) for w in ("num_warps", "num_stages") if w in cfg}
    if pages is not None and u % cfg["BLOCK_K"] and u % 16 == 0:
        cfg["BLOCK_K"] = 16  # rank chunks within one page: one page id per chunk, contiguous B loads
    bn = cfg["BLOCK_N"]
    tile_ends = []
    for w in widths:
        tile_ends.append((tile_ends[-1] if tile_ends else 0) + triton.cdiv(w, bn))
    offs = list(slice_offsets[1:]) + [slice_offsets[-1]] * (3 - n_slices)
    nts = (tile_ends + [tile_ends[-1]] * 2)[:2]
    tiles, n_tiles = seg.tile_range(cfg["BLOCK_M"])
    grid = (tile_ends[-1], n_tiles)
    if y.device.type == "cpu":
        launch = {}
    _kernel("expand", y.device)[grid](
        y, h, b, tiles, seg.starts, seg.slots, seg.ranks, pg,
        r_pad, u, offs[0], offs[1], offs[2], nts[0], nts[1],
        y.stride(0), y.stride(1), h.stride(0), h.stride(1), b.stride(0), b.stride(1), b.stride(2), stride_pg,
        PRECISION=_precision(b.dtype), DOT_FP32=INTERPRETED, PAGED=pages is not None,
        ONE_PAGE=pages is not None and u % cfg["BLOCK_K"] == 0, **cfg, **launch)
