"""Paged attention over a block-table KV cache: one op for decode and chunked prefill.

Backends
  cpp        C++ extension (kernels/csrc/paged_attention.cpp), JIT-built on first use. Reads each
             sequence's K/V rows once, straight from the paged cache, with an online softmax.
  torch      vectorized torch: gather each distinct sequence's slots into a padded [U, L] batch,
             one SDPA with a boolean causal/length mask. Works on any device (CUDA too).
  reference  per-token loop, fp32 math; the oracle for tests.
  auto       cpp for CPU fp32/bf16 tensors with a contiguous last dim if the extension builds,
             otherwise torch (tests, benchmarks). The server names the backend instead: its
             attention backend (server/engine/backends/) is chosen once at engine start and
             decides per step which layers need the torch path.

Build: the extension is compiled once per (python, torch, ISA) under
$TORCH_EXTENSIONS_DIR (default ~/.cache/loramux/torch_extensions). The ISA is "avx2" (built with
-mavx2 -mfma, used only when torch reports an AVX2/AVX512 CPU) or "generic" (no ISA flags);
never -march=native, so a cache directory shared between different machines cannot hand an
AVX-512 binary to a CPU without it. If the build fails (no compiler, no ninja) one warning is
logged and `auto` uses the torch backend. cpp_extension needs `ninja` on PATH. Loads lock the
build directory (kernels/cpp_build.py): concurrent first starts build once, a build killed
midway is redone by the next start instead of hanging it, and waiting for a live builder is
logged and bounded (then the torch backend is used).

Threads: the cpp backend uses torch.get_num_threads() threads: the caller plus persistent helper
threads of the extension (sleeping between calls). It does not use torch's OpenMP pool: on an
oversubscribed machine an OpenMP region waits for descheduled workers (4-8 ms per call measured
here); the caller instead does all unclaimed work itself and waits only for running items.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cpp_build

log = logging.getLogger(__name__)

__all__ = ["paged_attention", "paged_attention_reference", "cpp_available", "cpp_error", "load_cpp_extension"]

_SRC = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# 2: every load holds the directory's build.flock, so a `lock` file found under it is a dead
# builder's (kernels/cpp_build.py). Loaders of layout 1 (no suffix) did not take the flock and
# must never share a directory with layout 2, or a live build's `lock` could be removed.
_CACHE_LAYOUT = 2
_LOCK = threading.Lock()
_EXT: object | None = None
_EXT_ERROR: str | None = None
BUILD_INFO: dict = {}  # isa, dir, seconds, compiled (False: loaded from the cache), for reporting

# Tokens of one sequence processed together (prefill): each K/V row is reused by tile*G
# query vectors; 32 / G keeps the tile's queries + accumulators within L2 for any model.
_MAX_TILE_QUERIES = 32
# Shortest context range worth its own work item when a long context is split across threads.
_MIN_SPLIT = 128


def _isa() -> str:
    cap = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY overrides
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "avx2" if x86 and cap in ("AVX2", "AVX512") else "generic"


def _build_dir(isa: str) -> Path:
    """Where the extension for `isa` is built: one directory per (python, torch, ISA, cache layout)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "loramux" / "torch_extensions")
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__.replace('+', '_')}_l{_CACHE_LAYOUT}"
    return Path(root) / tag / f"loramux_paged_attention_{isa}"


def load_cpp_extension():
    """Build (first time) and load the C++ extension; returns the op, or None if it cannot build.

    Thread-safe; call it at startup to take the one-time compile (~15 s) off the first request."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None or _EXT_ERROR is not None:
            return _EXT
        t0 = time.perf_counter()
        try:
            isa = _isa()
            build_dir = _build_dir(isa)
            cflags = ["-O3", "-DNDEBUG", "-pthread", "-fno-math-errno"]  # no -ffast-math: exact IEEE semantics
            if isa == "avx2":
                cflags += ["-mavx2", "-mfma"]
            _, compiled = cpp_build.load_library(build_dir.name, [str(_SRC)], build_dir, cflags, ["-pthread"])
            _EXT = torch.ops.loramux_attn.paged_attention.default  # OpOverload: the cheapest call path
            BUILD_INFO.update(isa=isa, dir=str(build_dir), seconds=time.perf_counter() - t0, compiled=compiled)
            log.info("paged_attention C++ extension (%s) %s in %.1f s (%s)", isa,
                     "compiled" if BUILD_INFO["compiled"] else "loaded", BUILD_INFO["seconds"], build_dir)
        except Exception as e:  # no compiler, no ninja, headers missing...: fall back, never crash
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = next((ln for ln in lines if "error:" in ln), next((ln for ln in lines if "rror" in ln), lines[0] if lines else ""))
            _EXT_ERROR = f"{type(e).__name__}: {first[:300]}"
            log.warning("paged_attention: C++ extension unavailable (%s); using the torch backend", _EXT_ERROR)
        return _EXT


def cpp_available() -> bool:
    return load_cpp_extension() is not None


def cpp_error() -> str | None:
    """Why the extension could not be built (None if it built or was not tried)."""
    return _EXT_ERROR


_CPP_DTYPES = (torch.float32, torch.bfloat16)
_BACKENDS = ("auto", "cpp", "torch", "reference")


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 and x.is_contiguous() else x.to(torch.int32).contiguous()


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, token_seq: torch.Tensor,
                    token_ctx: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
                    backend: str = "auto", window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of T query tokens over their sequences' paged K/V.

    q            [T, H, D] fp32/bf16, RoPE applied.
    kv_cache     [S, 2, KVH, D] one layer, S = num_blocks * block_size, [:, 0] = K, [:, 1] = V, q's dtype.
                 Any strides with a contiguous last dim (a [2, S, KVH, D] cache passed as
                 `cache.transpose(0, 1)` is fine).
    block_tables [B, max_blocks] int32; row b = block ids of sequence b (unused entries arbitrary).
    token_seq    [T] int32: block-table row of each token.
    token_ctx    [T] int32: positions [0, ctx) the token attends to (its position + 1), >= 1.
    window       sliding window: a token sees only positions [ctx - window, ctx) (itself included).
    softcap      scores (after `scale`) become softcap * tanh(scores / softcap) before the softmax.
                 The cpp backend has neither option: with either set, `auto` runs the torch backend.
    Query head h uses kv head h // (H // KVH). Returns out [T, H, D] (q's dtype), written in place
    if `out` is given. The cpp backend checks every index it follows (token_seq, ctx against the
    block table width, block ids against the cache) and raises instead of reading out of bounds.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if q.shape[0] == 0:
        return out
    if backend == "auto" and window is not None and q.is_cpu and window >= int(token_ctx.max()):
        window = None  # masks nothing in this batch: keep the fast path (no device sync on CPU)
    if window is not None or softcap is not None:
        if backend == "cpp":
            raise ValueError("the cpp backend supports neither a sliding window nor soft-capping")
        backend = "torch" if backend == "auto" else backend
    if backend == "auto" or backend == "cpp":
        ok = (q.is_cpu and kv_cache.is_cpu and q.dtype in _CPP_DTYPES and kv_cache.dtype == q.dtype
              and kv_cache.stride(-1) == 1)
        op = (_EXT if _EXT is not None else load_cpp_extension()) if ok or backend == "cpp" else None
        if op is not None and ok:
            dst = out if out.stride(-1) == 1 else torch.empty(q.shape, dtype=q.dtype)
            G = q.shape[1] // kv_cache.shape[2]
            op(q if q.stride(-1) == 1 else q.contiguous(), kv_cache, _int32(block_tables), _int32(token_seq),
               _int32(token_ctx), int(block_size), float(scale), dst, max(1, _MAX_TILE_QUERIES // max(G, 1)),
               _MIN_SPLIT)
            if dst is not out:
                out.copy_(dst)
            return out
        if backend == "cpp":
            if op is None:
                raise RuntimeError(f"paged_attention C++ extension unavailable: {_EXT_ERROR}")
            raise ValueError("the cpp backend needs CPU fp32/bf16 q and kv_cache of one dtype, kv_cache.stride(-1) == 1")
        backend = "torch"
    if backend == "torch":
        res = _paged_attention_torch(q, kv_cache, block_tables, token_seq, token_ctx, block_size, scale,
                                     window, softcap)
    else:
        res = paged_attention_reference(q, kv_cache, block_tables, token_seq, token_ctx, block_size, scale,
                                        window, softcap)
    out.copy_(res)
    return out


def _paged_attention_torch(q, kv_cache, block_tables, token_seq, token_ctx, block_size, scale, window=None,
                           softcap=None):
    """Gather each distinct sequence's first L_u slots into [U, KVH, L, D] and run one SDPA.

    Tokens of one sequence become the query rows of one batch entry (GQA folded: the G heads of a
    kv head are stacked on the query axis), so decode and prefill share the path. Padding
    positions re-read the sequence's last valid slot (finite data) and are masked out, so unused
    cache slots and block-table padding are never touched.
    """
    T, H, D = q.shape
    KVH = kv_cache.shape[2]
    G = H // KVH
    dev = q.device
    seq = token_seq.to(device=dev, dtype=torch.long)
    ctx = token_ctx.to(device=dev, dtype=torch.long)
    useq, inv = torch.unique(seq, return_inverse=True)
    U = useq.numel()
    if U == T:  # pure decode: one token per sequence, no reordering
        rank = torch.zeros_like(inv)
        Q = 1
    else:  # rank of each token within its sequence
        order = torch.argsort(inv, stable=True)
        counts = torch.bincount(inv, minlength=U)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(T, device=dev) - starts[inv[order]]
        Q = int(counts.max())
    L_u = torch.zeros(U, dtype=torch.long, device=dev).scatter_reduce(0, inv, ctx, "amax")
    L = int(L_u.max())
    pos = torch.arange(L, device=dev)
    posc = torch.minimum(pos[None, :], (L_u - 1).clamp(min=0)[:, None])  # [U, L]
    bt = block_tables.to(device=dev, dtype=torch.long)[useq]
    slots = bt.gather(1, posc // block_size) * block_size + posc % block_size
    kv = kv_cache.index_select(0, slots.reshape(-1)).view(U, L, 2, KVH, D)
    k = kv[:, :, 0].transpose(1, 2)  # [U, KVH, L, D]
    v = kv[:, :, 1].transpose(1, 2)
    qp = q.new_zeros(U, Q, H, D)
    qp[inv, rank] = q
    qf = qp.view(U, Q, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(U, KVH, G * Q, D)
    ctxp = torch.ones(U, Q, dtype=torch.long, device=dev)  # padding queries see position 0 (no NaN)
    ctxp[inv, rank] = ctx
    visible = pos[None, None, :] < ctxp[:, :, None]  # [U, Q, L]
    if window is not None:
        visible &= pos[None, None, :] >= ctxp[:, :, None] - window
    mask = visible[:, None, None].expand(U, 1, G, Q, L).reshape(U, 1, G * Q, L)
    if softcap is None:
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)  # [U, KVH, G*Q, D]
    else:  # SDPA has no soft-capping: the same math spelled out, in fp32 as transformers' eager path
        s = torch.matmul(qf.float(), k.float().transpose(-1, -2)) * scale
        s = torch.tanh(s / softcap) * softcap
        o = torch.matmul(s.masked_fill(~mask, float("-inf")).softmax(-1), v.float()).to(q.dtype)
    o = o.view(U, KVH, G, Q, D).permute(0, 3, 1, 2, 4).reshape(U, Q, H, D)
    return o[inv, rank]


def paged_attention_reference(q, kv_cache, block_tables, token_seq, token_ctx, block_size, scale, window=None,
                              softcap=None):
    """Per-token loop in fp32; slow and obvious. Returns [T, H, D] in q's dtype."""
    T, H, D = q.shape
    G = H // kv_cache.shape[2]
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    for t in range(T):
        b, n = int(token_seq[t]), int(token_ctx[t])
        p = torch.arange(max(0, n - window) if window is not None else 0, n, device=q.device)
        slots = block_tables[b].long().to(q.device)[p // block_size] * block_size + p % block_size
        k = kv_cache[slots, 0].float().repeat_interleave(G, dim=1)  # [n, H, D]
        v = kv_cache[slots, 1].float().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[t].float(), k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out.to(q.dtype)
