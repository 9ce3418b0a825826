"""Triton paged attention (kernels/triton_paged_attention.py) against paged_attention_reference.

CPU: the kernel runs under Triton's interpreter at tiny shapes (this module sets
TRITON_INTERPRET=1 before triton is imported; if triton was imported earlier in the same process,
the interpreter tests rerun themselves in a subprocess so the variable never leaks into other
tests). CUDA: the same cases plus model-sized ones, a CUDA-graph capture and a no-sync check.

Every case uses shuffled, non-contiguous block ids; cache slots no sequence owns (and the blocks
that block-table padding points at) hold NaN, so reading anything outside a sequence's context
poisons the output.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

from triton_mode import CHILD, CUDA, ROOT, kernel_module, rerun_in_child  # before anything imports triton

import torch  # noqa: E402

import pytest  # noqa: E402

from kernels.paged_attention import paged_attention_reference  # noqa: E402
from test_paged_attention import far_cache  # noqa: E402

tpa = kernel_module("triton_paged_attention")
HAVE_TRITON = tpa is not None
INTERP = HAVE_TRITON and tpa.INTERPRETED


@dataclass
class Case:
    seqs: list  # (context length, query tokens at its end) per sequence
    heads: int
    kv_heads: int
    head_dim: int = 64
    block_size: int = 4
    shuffle_tokens: bool = False  # tokens of different sequences interleaved in the batch


CASES = {
    "decode": Case([(5, 1), (17, 1), (9, 1)], 4, 2),
    "decode_mha_long": Case([(40, 1), (7, 1), (33, 1)], 2, 2),
    "prefill": Case([(20, 20)], 4, 1),  # G = 4
    "mixed_chunked": Case([(12, 1), (19, 6), (5, 5), (9, 1)], 4, 2),  # (19, 6): 13 cached + a 6-token chunk
    "mixed_shuffled": Case([(11, 3), (6, 1), (14, 4)], 6, 2, shuffle_tokens=True),  # G = 3: padded rows
    "decode_gqa8": Case([(37, 1), (3, 1), (20, 1)], 8, 1, head_dim=32),  # G = 8 (Llama-70B-like): 8 of 16 rows
}


def make(case: Case, dtype, device="cpu", seed=0):
    """q, kv_cache (NaN outside every sequence's slots), block tables (shuffled ids, padding
    pointing at a NaN block), token_seq, token_ctx, in the contract's layout."""
    g = torch.Generator().manual_seed(seed)
    bs = case.block_size
    need = [math.ceil(c / bs) for c, _ in case.seqs]
    n_blocks = sum(need) + 3
    ids = torch.randperm(n_blocks, generator=g)
    width = max(need) + 2
    nan_block = int(ids[-1])
    bt = torch.full((len(case.seqs), width), nan_block, dtype=torch.int32)
    kv = torch.full((n_blocks * bs, 2, case.kv_heads, case.head_dim), float("nan"))
    used = 0
    seq, ctx = [], []
    for b, (c, n) in enumerate(case.seqs):
        bt[b, :need[b]] = ids[used:used + need[b]]
        used += need[b]
        for p in range(c):
            slot = int(bt[b, p // bs]) * bs + p % bs
            kv[slot] = torch.randn(2, case.kv_heads, case.head_dim, generator=g)
        seq += [b] * n
        ctx += list(range(c - n + 1, c + 1))
    seq, ctx = torch.tensor(seq, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32)
    if case.shuffle_tokens:
        perm = torch.randperm(len(seq), generator=g)
        seq, ctx = seq[perm], ctx[perm]
    q = torch.randn(len(seq), case.heads, case.head_dim, generator=g)
    dev = lambda x: x.to(device)  # noqa: E731
    return dev(q.to(dtype)), dev(kv.to(dtype)), dev(bt), dev(seq), dev(ctx)


def oracle(q, kv, bt, seq, ctx, bs, scale, window=None, softcap=None):
    """Independent dense fp32 loop with the two options (the project reference has neither)."""
    T, H, D = q.shape
    G = H // kv.shape[2]
    out = torch.empty(T, H, D, dtype=torch.float64)
    for t in range(T):
        b, n = int(seq[t]), int(ctx[t])
        lo = max(0, n - window) if window else 0
        p = torch.arange(lo, n)
        slots = bt[b].long().cpu()[p // bs] * bs + p % bs
        k = kv.cpu()[slots, 0].double().repeat_interleave(G, dim=1)
        v = kv.cpu()[slots, 1].double().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[t].cpu().double(), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# On a GPU the softmax weights are rounded to q's dtype before the product with V (the
# interpreter keeps them in float32): an error of about one rounding step of the output itself,
# which grows with its magnitude (bf16: 2^-8 relative).
REL = {torch.float32: 0.0, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def check(out, ref, dtype):
    assert torch.isfinite(out).all(), "non-finite output: read outside the context or unwritten"
    ref = ref.cpu().double()
    excess = (out.cpu().double() - ref).abs() - (TOL[dtype] + REL[dtype] * ref.abs())
    assert excess.max().item() < 0, f"error over {TOL[dtype]} + {REL[dtype]} x |ref| by {excess.max().item():.3g}"


def run_case(case, dtype, device, config=None, seed=0, **kw):
    case = CASES[case] if isinstance(case, str) else case
    q, kv, bt, seq, ctx = make(case, dtype, device, seed)
    scale = case.head_dim ** -0.5
    ref = paged_attention_reference(q, kv, bt, seq, ctx, case.block_size, scale)
    out = torch.full_like(q, float("nan"))
    max_q = max(n for _, n in case.seqs)
    res = tpa.paged_attention_triton(q, kv, bt, seq, ctx, case.block_size, scale, out=out,
                                     max_context_len=max(c for c, _ in case.seqs), max_query_len=max_q,
                                     config=config, **kw)
    assert res is out
    check(out, ref, dtype)


# ---------------------------------------------------------------- interpreter on CPU (tiny)

needs_interp = pytest.mark.skipif(not INTERP, reason="Triton interpreter not active in-process")

# (case, dtype, launch overrides): decode and prefill tilings, split-K with empty splits,
# tiles straddling sequences, GQA with padded rows
INTERP_RUNS = [
    ("decode", torch.float32, dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=1)),
    ("decode_mha_long", torch.float32, dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=3)),
    ("prefill", torch.float32, dict(BLOCK_T=8, BLOCK_N=16, NUM_SPLITS=1)),
    ("mixed_chunked", torch.float32, dict(BLOCK_T=4, BLOCK_N=16, NUM_SPLITS=2)),
    ("mixed_chunked", torch.bfloat16, dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=1)),
    ("mixed_shuffled", torch.float32, dict(BLOCK_T=4, BLOCK_N=16, NUM_SPLITS=1)),
    ("mixed_shuffled", torch.float16, None),  # launch_config's own choice
    ("decode_gqa8", torch.float32, dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=3)),  # splits need not be powers of 2
]


@needs_interp
@pytest.mark.parametrize("name,dtype,config", INTERP_RUNS,
                         ids=[f"{n}-{str(d)[6:]}-{c and '_'.join(map(str, c.values()))}" for n, d, c in INTERP_RUNS])
def test_triton_interp_matches_reference(name, dtype, config):
    run_case(name, dtype, "cpu", config)


@needs_interp
def test_triton_interp_tile_table():
    # runs of one sequence's tokens (1, 6, 5, 1) cut into tiles of <= 4 tokens, none straddling
    tiles = tpa.query_tiles([1, 6, 5, 1], 4, "cpu")
    assert tiles.tolist() == [[0, 1], [1, 4], [5, 2], [7, 4], [11, 1], [12, 1]]
    run_case("mixed_chunked", torch.float32, "cpu", config=dict(BLOCK_T=4, BLOCK_N=16, NUM_SPLITS=2), tiles=tiles)
    # the kernel follows the table: a token no tile covers is left unwritten
    q, kv, bt, seq, ctx = make(CASES["mixed_chunked"], torch.float32)
    out = torch.full_like(q, float("nan"))
    tpa.paged_attention_triton(q, kv, bt, seq, ctx, 4, 0.125, out, max_query_len=6, tiles=tiles[:-1].clone(),
                               config=dict(BLOCK_T=4, BLOCK_N=16))
    assert torch.isfinite(out[:12]).all() and torch.isnan(out[12]).all()


@needs_interp
def test_triton_interp_strided_views():
    # as the engine passes them: q a view into the fused qkv rows, out a view too, and a cache
    # stored [2, S, KVH, D] handed over as .transpose(0, 1)
    case = CASES["mixed_chunked"]
    q, kv, bt, seq, ctx = make(case, torch.float32, seed=4)
    T, H, D = q.shape
    qkv = torch.randn(T, H + 4, D)
    qkv[:, :H] = q
    kv_t = kv.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.full((T, H + 2, D), float("nan"))
    tpa.paged_attention_triton(qkv[:, :H], kv_t, bt.long(), seq.long(), ctx, 4, D ** -0.5, wide[:, 1:H + 1],
                               max_query_len=6, config=dict(BLOCK_N=16))
    check(wide[:, 1:H + 1], paged_attention_reference(q, kv, bt, seq, ctx, 4, D ** -0.5), torch.float32)
    assert torch.isnan(wide[:, 0]).all() and torch.isnan(wide[:, H + 1]).all(), "wrote outside out's view"


@needs_interp
def test_triton_interp_window_softcap():
    case = CASES["mixed_chunked"]
    q, kv, bt, seq, ctx = make(case, torch.float32, seed=3)
    scale = case.head_dim ** -0.5
    # the oracle agrees with the project's reference when both options are off
    base = oracle(q, kv, bt, seq, ctx, case.block_size, scale)
    assert (base - paged_attention_reference(q, kv, bt, seq, ctx, case.block_size, scale).double()).abs().max() < 1e-5
    ref = oracle(q, kv, bt, seq, ctx, case.block_size, scale, window=5, softcap=2.0)
    assert (ref - base).abs().max() > 0.05, "options had no effect: test would be vacuous"
    out = tpa.paged_attention_triton(q, kv, bt, seq, ctx, case.block_size, scale, sliding_window=5, softcap=2.0,
                                     config=dict(BLOCK_T=4, BLOCK_N=16, NUM_SPLITS=2))
    check(out, ref, torch.float32)


@needs_interp
def test_triton_interp_fixed_splits_with_short_contexts():
    """A CUDA graph's decode step fixes NUM_SPLITS for the longest context the engine allows
    (server/engine/cuda_graphs.py): short contexts leave splits with no keys (log-sum-exp -inf),
    which the combine must weigh zero. Contexts 1 and 3 use one split of 8, 40 uses three."""
    case = Case([(3, 1), (1, 1), (40, 1), (9, 1), (17, 1)], 4, 2)
    run_case(case, torch.float32, "cpu", config=dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=8))
    run_case(case, torch.bfloat16, "cpu", config=dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=8), seed=1)


@needs_interp
def test_triton_interp_offsets_past_int32():
    q, kv, bt, seq, ctx, bs = far_cache(torch.float16)
    ref = paged_attention_reference(q, kv, bt, seq, ctx, bs, 0.25)
    for config in (dict(BLOCK_T=1, BLOCK_N=16, NUM_SPLITS=2), dict(BLOCK_T=4, BLOCK_N=16, NUM_SPLITS=1)):
        check(tpa.paged_attention_triton(q, kv, bt, seq, ctx, bs, 0.25, config=config), ref, torch.float16)


@needs_interp
def test_triton_interp_rejects_bad_shapes():
    q, kv, bt, seq, ctx = make(CASES["decode"], torch.float32)
    with pytest.raises(AssertionError, match="power of two"):
        tpa.paged_attention_triton(q[..., :48], kv[..., :48], bt, seq, ctx, 4, 0.1)
    with pytest.raises(AssertionError, match="multiple of kv heads"):
        tpa.paged_attention_triton(q[:, :3], kv, bt, seq, ctx, 4, 0.1)
    with pytest.raises(AssertionError, match="dtypes"):
        tpa.paged_attention_triton(q.bfloat16(), kv, bt, seq, ctx, 4, 0.1)
    empty = tpa.paged_attention_triton(q[:0], kv, bt, seq[:0], ctx[:0], 4, 0.1)
    assert empty.shape == (0, 4, 64)


@pytest.mark.skipif(INTERP or CUDA or not HAVE_TRITON or CHILD,
                    reason="interpreter tests already ran in-process (or no triton)")
def test_triton_interp_in_subprocess():
    rerun_in_child(__file__)  # triton was imported before this module could switch the interpreter on


# ---------------------------------------------------------------- compiled for sm_90, without a GPU

# Triton's compiler runs on any host: the launch wrapper runs over meta tensors at model shapes and
# each launch is specialised as a real one would be and lowered to an sm_90 cubin (tests/sm90_aot.py),
# so errors the interpreter cannot see, shared memory past an H100's, and launch arguments that
# compile a new variant as the batch changes (seconds per compile, mid-serving) show up on CPU CI.
# In a child process with the interpreter off (this one may have it on).
COMPILED = HAVE_TRITON and not INTERP
needs_compiler = pytest.mark.skipif(not COMPILED, reason="kernels interpreted here (test_sm90_in_subprocess)")


def _attend(H, KVH, D, dtype, seqs, bs=16, window=None, softcap=None, graph=False):
    """One step's launch over meta tensors laid out as the engine's: q a view of the fused qkv rows,
    the layer's cache a view of all layers', the int tables views at step-dependent offsets of one
    upload buffer (server/engine/step_upload.py); launch sizes as on an H100 (132 SMs)."""
    dev = "meta"
    T, mq, mc = sum(n for _, n in seqs), max(n for _, n in seqs), max(c for c, _ in seqs)
    width = max(-(-c // bs) for c, _ in seqs)
    at = len(seqs) % 4  # where this step's tables start in the upload buffer
    buf = torch.empty(at + 2 * T + len(seqs) * width, dtype=torch.int32, device=dev)
    seq, ctx = buf[at:at + T], buf[at + T:at + 2 * T]
    bt = buf[at + 2 * T:].view(len(seqs), width)
    q = torch.empty(T, (H + 2 * KVH) * D, dtype=dtype, device=dev)[:, :H * D].view(T, H, D)
    kv = torch.empty(2, 4096, 2, KVH, D, dtype=dtype, device=dev)[1]
    block_t = 1 if graph else tpa.tile_tokens(H, KVH, mq)
    # as TritonStep: a tile table for prefill tilings only
    tiles = None if block_t == 1 else tpa.query_tiles([n for _, n in seqs], block_t, dev)
    n_tiles = T if tiles is None else tiles.shape[0]
    # a CUDA graph fixes its split count for the longest context the engine allows
    cfg = dict(tpa.launch_config(torch.device("cuda", 0), n_tiles, KVH, D, q.element_size(), 32768 if graph else mc),
               BLOCK_T=block_t)
    tpa.paged_attention_triton(q, kv, bt, seq, ctx, bs, D ** -0.5, max_context_len=mc, max_query_len=mq,
                               tiles=tiles, sliding_window=window, softcap=softcap, config=cfg)


def _llama_8b_steps(dtype=torch.bfloat16):
    # decode batches of every size and growing contexts (eager and graph launches), then mixed
    # steps: chunked prefills of all lengths next to decodes
    for B in (1, 2, 3, 7, 16, 17, 33, 64, 100):
        for c in (5, 17, 300, 1000, 5000, 32768):
            _attend(32, 8, 128, dtype, [(c - i % 3, 1) for i in range(B)], graph=B in (1, 16, 64))
    for seqs in ([(300, 120), (9, 1)], [(64, 64)], [(2000, 2), (17, 1), (40, 1)], [(5, 5)], [(4096, 512)] * 4,
                 [(8000, 3)] + [(50, 1)] * 30):
        _attend(32, 8, 128, dtype, seqs)


@needs_compiler
def test_sm90_launch_variants_do_not_follow_the_step(monkeypatch):
    import sm90_aot as aot

    monkeypatch.setattr(tpa, "_num_sms", lambda index: 132)
    with aot.recording(tpa.__name__, "_fwd_jit", "_combine_jit") as rec:
        _llama_8b_steps()
    fwd, comb = aot.distinct(rec["_fwd_jit"]), aot.distinct(rec["_combine_jit"])
    assert len(rec["_fwd_jit"].calls) == 60 and len(rec["_combine_jit"].calls) > 10, "vacuous: no split-K steps"
    # decode or prefill tiling x split-K or not: nothing else about a step picks a compiled variant
    assert len(fwd) <= 4, f"{len(fwd)} compiled variants of the attention kernel over one model's steps"
    assert len(comb) == 1


@needs_compiler
def test_sm90_compiles_within_shared_memory(monkeypatch):
    import sm90_aot as aot

    monkeypatch.setattr(tpa, "_num_sms", lambda index: 132)
    with aot.recording(tpa.__name__, "_fwd_jit", "_combine_jit") as rec:
        _llama_8b_steps()
        # fp32 (FMA products), head_dim 256 with a window and soft-capping (Gemma 2-like), MHA,
        # GQA group 3 (padded rows), and one 128-head group (BLOCK_M 128)
        _attend(32, 8, 128, torch.float32, [(900, 1), (300, 40)])
        _attend(8, 4, 256, torch.bfloat16, [(5000, 1), (300, 40)], window=4096, softcap=50.0)
        _attend(32, 32, 128, torch.float16, [(900, 1), (300, 40)])
        _attend(24, 8, 64, torch.bfloat16, [(900, 1), (300, 40)])
        _attend(128, 1, 128, torch.bfloat16, [(3000, 1)])
    assert aot.compile_within_shared_memory(rec) >= 10


@pytest.mark.skipif(COMPILED or not HAVE_TRITON or CHILD, reason="sm_90 tests already ran in-process (or no triton)")
def test_sm90_in_subprocess():
    pytest.importorskip("triton.backends.nvidia")
    rerun_in_child(__file__, "sm90", interpret=False)


# ---------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("name,dtype,config", INTERP_RUNS)
def test_cuda_matches_reference_tiny(name, dtype, config):
    run_case(name, dtype, "cuda", config)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_cuda_model_shapes(dtype, kind):
    # Llama-3-8B attention shape (H 32, KVH 8, D 128), block 16, contexts up to 1500: split-K
    # engages for decode; the mixed batch has chunked prefills next to decodes
    seqs = [(1500, 1), (37, 1), (700, 1), (1, 1)] if kind == "decode" else [(1500, 1), (300, 120), (64, 64), (9, 1)]
    run_case(Case(seqs, 32, 8, head_dim=128, block_size=16), dtype, "cuda", seed=7)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_long_contexts_gqa8_split_k(dtype):
    # 32k and 8k decode contexts next to a short one, 8 query heads per kv head: launch_config
    # splits the keys (not a power of two: 22 here); the short context leaves most splits empty
    seqs = [(32768, 1), (8192, 1), (100, 1)]
    cfg = tpa.launch_config(torch.device("cuda"), 3, 4, 128, 2, 32768)
    assert cfg["NUM_SPLITS"] > 8, cfg
    run_case(Case(seqs, 32, 4, head_dim=128, block_size=16), dtype, "cuda", seed=13)


@needs_cuda
def test_cuda_head_dim_64_window_softcap():
    case = Case([(400, 1), (90, 30), (17, 1)], 8, 2, head_dim=64, block_size=16)
    q, kv, bt, seq, ctx = make(case, torch.bfloat16, "cuda", seed=9)
    ref = oracle(q, kv, bt, seq, ctx, 16, 0.125, window=64, softcap=30.0)
    out = tpa.paged_attention_triton(q, kv, bt, seq, ctx, 16, 0.125, max_context_len=400, max_query_len=30,
                                     sliding_window=64, softcap=30.0)
    check(out, ref, torch.bfloat16)


@needs_cuda
def test_cuda_no_host_sync_and_graph_capture():
    # the decode call must neither synchronise nor allocate differently between capture and replay
    case = Case([(900, 1), (33, 1), (257, 1)], 32, 8, head_dim=128, block_size=16)
    q, kv, bt, seq, ctx = make(case, torch.bfloat16, "cuda", seed=11)
    out = torch.empty_like(q)
    call = lambda: tpa.paged_attention_triton(q, kv, bt, seq, ctx, 16, 128 ** -0.5, out=out,  # noqa: E731
                                              max_context_len=1024, max_query_len=1)
    call()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, paged_attention_reference(q, kv, bt, seq, ctx, 16, 128 ** -0.5), torch.bfloat16)


# ---------------------------------------------------------------- the GPU benchmark's entry point

@pytest.mark.skipif(CUDA, reason="checks the no-CUDA message")
def test_bench_triton_backend_fails_clearly_without_cuda():
    r = subprocess.run([sys.executable, "loadtest/bench_attention.py", "--backend", "triton"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


@needs_cuda
def test_cuda_bench_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "loadtest"))
    import bench_attention
    lines = bench_attention.run_gpu(repeats=3, cases=[("decode B=8 ctx=600", 8, 600, 0, 0),
                                                      ("mixed", 4, 300, 40, 100)], layers=1)
    assert len(lines) == 4 and all("nan" not in ln for ln in lines)
