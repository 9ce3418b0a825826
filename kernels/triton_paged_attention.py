"""Triton paged attention: decode and chunked prefill in one ragged batch, read through block tables.

Same contract as kernels.paged_attention.paged_attention (q [T, H, D], kv_cache [S, 2, KVH, D],
block_tables, token_seq, token_ctx, block_size, scale), so it can serve as that op's GPU backend.
No gather copy, no host synchronisation: every per-token datum is read on the device; launch
sizes come from T and host ints the caller already has (max_context_len, max_query_len).

Layout of the work
  One program = (tile of <= BLOCK_T consecutive query tokens) x (one kv head) x (one K split).
  Its rows are the tile's tokens x the G query heads sharing that kv head (GQA folded onto the
  row axis, padded to >= 16 rows so both products run on the matrix units). Tokens carry their
  own sequence and context, in any order: the program walks the distinct sequences in its tile
  (one pass over the K/V of each), so the result never depends on the tiling. Decode uses
  BLOCK_T = 1 (one token, G heads); prefill tiles several tokens of one sequence so each K/V row
  read serves BLOCK_T * G queries. Tiles are fixed token windows by default, and one that
  straddles sequences costs one K/V pass per sequence, serially; a caller that knows its batch
  (runs of one sequence's tokens, in order) passes a tile table from query_tiles instead, so no
  tile straddles (as the LoRA kernels' segment tiles).
  Split-K (long decode contexts, few programs): each split covers an equal share of its
  sequence's key range and writes a normalised partial output and its log-sum-exp; a second
  small kernel combines the splits. With one split the first kernel writes `out` directly.

Options: `sliding_window` W (a query at position p sees keys p-W+1 .. p, as HF / Mistral);
`softcap` c (scores s*scale -> c * tanh(s*scale / c), as Gemma 2).

CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported;
tests/test_triton_paged_attention.py arranges this) and are for tests at tiny shapes only.
"""

from __future__ import annotations

import functools
from array import array

import torch
import triton
import triton.language as tl

from .segments import upload
from .triton_jit import jit

__all__ = ["paged_attention_triton", "launch_config", "query_tiles", "tile_tokens", "INTERPRETED"]

_LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: readable inside kernels
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Fewest keys worth a split of their own: below this the combine costs more than it saves.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 32


def _attn_fwd(
    q_ptr, kv_ptr, bt_ptr, seq_ptr, ctx_ptr, tiles_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    T, H, G, block_size, qk_scale, softcap, window, num_splits,
    stride_qt, stride_qh, stride_ks, stride_kkv, stride_kh, stride_bt, stride_ot, stride_oh,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_TILES: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    rows = tl.arange(0, BLOCK_M)
    if USE_TILES:  # (first token, count <= BLOCK_T) from the caller's tile table
        t0 = tl.load(tiles_ptr + 2 * pid_t)
        t_len = tl.load(tiles_ptr + 2 * pid_t + 1)
    else:
        t0 = pid_t * BLOCK_T
        t_len = BLOCK_T
    tok = t0 + rows // G_PAD
    g = rows % G_PAD
    row_ok = (rows < BLOCK_T * G_PAD) & (rows // G_PAD < t_len) & (g < G) & (tok < T)
    head = kvh * G + g
    seq = tl.load(seq_ptr + tok, mask=row_ok, other=-1)
    ctx = tl.load(ctx_ptr + tok, mask=row_ok, other=0)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    kv_base = kv_ptr + kvh * stride_kh

    pending = row_ok
    n_pending = tl.sum(pending.to(tl.int32))
    while n_pending > 0:
        # one sequence of the tile (all its rows, wherever they sit) per pass
        s0 = tl.max(tl.where(pending, seq, -1))
        in_seg = pending & (seq == s0)
        hi = tl.max(tl.where(in_seg, ctx, 0))
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(tl.min(tl.where(in_seg, ctx - window, hi)), 0)
        split_len = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        start = lo + split * split_len
        end = tl.minimum(start + split_len, hi)
        bt_row = bt_ptr + s0.to(tl.int64) * stride_bt

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for k0 in range(start, end, BLOCK_N):
            pos = k0 + offs_n
            k_ok = pos < end
            blk = tl.load(bt_row + pos // block_size, mask=k_ok, other=0)
            slot = blk.to(tl.int64) * block_size + pos % block_size
            kv_off = slot[:, None] * stride_ks + offs_d[None, :]
            k = tl.load(kv_base + kv_off, mask=k_ok[:, None], other=0.0)
            v = tl.load(kv_base + stride_kkv + kv_off, mask=k_ok[:, None], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
            if USE_SOFTCAP:
                x = s * (qk_scale / softcap)
                s = softcap * _LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # c * tanh(x), log2 units
            else:
                s = s * (qk_scale * _LOG2E)
            vis = in_seg[:, None] & k_ok[None, :] & (pos[None, :] < ctx[:, None])
            if USE_WINDOW:
                vis = vis & (pos[None, :] >= ctx[:, None] - window)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has = l_i > 0.0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        if not SPLIT:
            tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=in_seg[:, None])
        else:
            part = (tok.to(tl.int64) * H + head) * num_splits + split
            tl.store(part_o_ptr + part[:, None] * D + offs_d[None, :], o, mask=in_seg[:, None])
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + part, lse, mask=in_seg)
        pending = pending & (seq != s0)
        n_pending = tl.sum(pending.to(tl.int32))


def _combine(
    part_o_ptr, part_lse_ptr, out_ptr, H, num_splits, stride_ot, stride_oh,
    D: tl.constexpr, S_PAD: tl.constexpr,
):
    # out[t, h] = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max); empty splits have lse -inf
    t = tl.program_id(0)
    h = tl.program_id(1)
    base = (t.to(tl.int64) * H + h) * num_splits
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    offs_d = tl.arange(0, D)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


# What changes from step to step must not pick a compiled variant (kernels/triton_jit.py): the token
# count, the split count, the block-table width, and the int tables' offsets in the step's upload
# buffer (their loads are gathers anyway).
_fwd_jit = jit(_attn_fwd, ints=("T", "num_splits", "stride_bt"), pointers=("bt_ptr", "seq_ptr", "ctx_ptr", "tiles_ptr"))
_combine_jit = jit(_combine, ints=("num_splits",))
# True when triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors). The
# interpreter's 16-bit tl.dot is wrong (triton 3.9; see kernels/triton_sgmv.py), so there the
# operands are widened to fp32; compiled kernels keep 16-bit matrix products.
INTERPRETED = type(_fwd_jit).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tile_tokens(H: int, KVH: int, max_query_len: int | None) -> int:
    """BLOCK_T: query tokens per program. 1 for decode (max_query_len 1 or unknown); for any step
    with a prefill chunk, enough tokens that tokens x padded GQA group fill ~64 rows of the matrix
    unit. Only these two values: BLOCK_T is a compile-time constant, and one that followed the
    step's longest chunk would compile a new kernel (seconds) the first time each size shows up;
    a tile table (query_tiles) keeps short runs in tiles of their own, so a larger BLOCK_T costs
    padded rows of the (cheap) products only, not K/V traffic."""
    if max_query_len is None or max_query_len <= 1:
        return 1
    return max(1, 64 // triton.next_power_of_2(H // KVH))


def query_tiles(run_lengths: list[int], block_t: int, device: torch.device | str) -> torch.Tensor:
    """Tile table [N, 2] int32 (first token, token count <= block_t) for a batch whose tokens come
    in runs of one sequence each, in this order (decode runs have length 1). Build it once per
    step (one host-to-device copy) and pass it with block_t = tile_tokens(H, KVH, max_query_len)."""
    tiles, start = array("i"), 0
    for n in run_lengths:
        for i in range(0, n, block_t):
            tiles.extend((start + i, min(block_t, n - i)))
        start += n
    if not tiles:
        return torch.zeros(0, 2, dtype=torch.int32, device=device)
    return upload(tiles, torch.int32, device).view(-1, 2)


def launch_config(device: torch.device, num_tiles: int, KVH: int, D: int, elt_bytes: int,
                  max_context_len: int | None) -> dict:
    """BLOCK_N and split count from host ints only (no device reads): split-K when the programs
    alone would not fill the GPU and contexts are long (decode)."""
    block_n = 32 if (elt_bytes == 4 and D >= 128) or D >= 256 else 64
    programs = num_tiles * KVH
    splits = 1
    if max_context_len is not None and device.type == "cuda":
        want = triton.cdiv(2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()),
                           programs)
        # a runtime argument of the kernels (only "split or not" is compiled in): free to follow
        # the context length step by step
        splits = max(1, min(want, triton.cdiv(max_context_len, _MIN_KEYS_PER_SPLIT), _MAX_SPLITS))
    return dict(BLOCK_N=block_n, NUM_SPLITS=splits)


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           token_seq: torch.Tensor, token_ctx: torch.Tensor, block_size: int, scale: float,
                           out: torch.Tensor | None = None, *, max_context_len: int | None = None,
                           max_query_len: int | None = None, tiles: torch.Tensor | None = None,
                           sliding_window: int | None = None, softcap: float | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """Attention of T query tokens over their sequences' paged K/V (kernels.paged_attention contract).

    q            [T, H, D] fp16/bf16/fp32 (RoPE applied), last dim contiguous; D a power of two >= 16.
    kv_cache     [S, 2, KVH, D], q's dtype, S = num_blocks * block_size; [:, 0] = K, [:, 1] = V;
                 any strides with a contiguous last dim. H must be a multiple of KVH.
    block_tables [B, max_blocks] int; token_seq [T] int (row of each token); token_ctx [T] int
                 (the token attends to positions [0, ctx), ctx >= 1). int32 avoids a conversion.
    max_context_len  host int >= every token_ctx, or None: enables split-K for decode on CUDA.
    max_query_len    host int, most query tokens of one sequence in this batch; > 1 selects the
                     prefill tiling (a pure performance hint: results do not depend on it).
    tiles            optional query_tiles(...) table built with tile_tokens(H, KVH, max_query_len);
                     it must cover every token once. Without it tiles are fixed token windows.
    sliding_window   keys older than ctx - W are skipped; softcap: c * tanh(scores / c).
    config           overrides BLOCK_T / BLOCK_N / NUM_SPLITS (tests).
    Returns out [T, H, D] in q's dtype (written in place if given). Indices are not bounds-checked.
    """
    T, H, D = q.shape
    KVH = kv_cache.shape[2]
    assert q.dtype in _DTYPES and kv_cache.dtype == q.dtype, f"q/kv_cache dtypes {q.dtype}/{kv_cache.dtype}"
    assert kv_cache.dim() == 4 and kv_cache.shape[1] == 2 and kv_cache.shape[3] == D, "kv_cache must be [S, 2, KVH, D]"
    assert H % KVH == 0, f"num heads {H} not a multiple of kv heads {KVH}"
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D} must be a power of two >= 16"
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "q and kv_cache need a contiguous last dim"
    assert sliding_window is None or sliding_window >= 1, "sliding_window must be >= 1"
    assert softcap is None or softcap > 0, "softcap must be > 0"
    dev = q.device
    assert kv_cache.device == dev and block_tables.device == dev and token_seq.device == dev \
        and token_ctx.device == dev, "all tensors must be on q's device"
    if dev.type == "cpu" and not INTERPRETED:
        raise RuntimeError("paged_attention_triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is first imported")
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, "bad out"
    if T == 0:
        return out
    block_t = (config or {}).get("BLOCK_T") or tile_tokens(H, KVH, max_query_len)
    assert tiles is None or (tiles.dtype == torch.int32 and tiles.dim() == 2 and tiles.shape[1] == 2
                             and tiles.is_contiguous() and tiles.device == dev), "tiles: [N, 2] int32 from query_tiles"
    num_tiles = tiles.shape[0] if tiles is not None else triton.cdiv(T, block_t)
    cfg = launch_config(dev, num_tiles, KVH, D, q.element_size(), max_context_len)
    cfg.update(config or {})
    splits = cfg["NUM_SPLITS"]
    assert 1 <= splits <= _MAX_SPLITS, f"NUM_SPLITS {splits} outside 1..{_MAX_SPLITS}"
    G = H // KVH
    g_pad = triton.next_power_of_2(G)
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    seq = token_seq if token_seq.dtype == torch.int32 else token_seq.to(torch.int32)
    ctx = token_ctx if token_ctx.dtype == torch.int32 else token_ctx.to(torch.int32)
    seq, ctx = seq.contiguous(), ctx.contiguous()
    assert bt.stride(-1) == 1, "block_tables needs a contiguous last dim"
    if splits > 1:
        part_o = torch.empty(T, H, splits, D, dtype=torch.float32, device=dev)
        part_lse = torch.empty(T, H, splits, dtype=torch.float32, device=dev)
    else:
        part_o = part_lse = out  # unused
    interp = INTERPRETED and dev.type == "cpu"
    extra = {} if interp else dict(num_warps=4 if block_t * g_pad <= 16 else 8, num_stages=2)
    grid = (num_tiles, KVH, splits)
    _fwd_jit[grid](
        q, kv_cache, bt, seq, ctx, tiles if tiles is not None else seq, out, part_o, part_lse,
        T, H, G, block_size, float(scale), float(softcap or 1.0), int(sliding_window or 0), splits,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
        out.stride(0), out.stride(1),
        D=D, G_PAD=g_pad, BLOCK_T=block_t, BLOCK_M=max(16, block_t * g_pad), BLOCK_N=cfg["BLOCK_N"],
        SPLIT=splits > 1, USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None,
        USE_TILES=tiles is not None, DOT_FP32=interp or q.dtype == torch.float32,
        PRECISION="ieee" if interp or q.dtype == torch.float32 else "tf32",
        **extra)
    if splits > 1:
        _combine_jit[(T, H)](part_o, part_lse, out, H, splits, out.stride(0), out.stride(1),
                             D=D, S_PAD=_MAX_SPLITS)
    return out
