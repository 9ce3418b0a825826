"""Paged attention: C++ and torch backends vs the per-token reference and vs an independent
HF-style formulation (contiguous K/V per sequence, repeat_kv, causal mask, fp64 softmax).

Every batch uses fresh random K/V in the slots it references and NaN everywhere else (unused
cache slots), garbage block-table padding, shuffled block ids and a NaN-poisoned `out`, so a read
of anything the op should not touch, or an output row it forgets to write, shows up as NaN.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from torch.utils.file_baton import FileBaton

from ext_build_runs import run_together
from kernels import paged_attention as pa
from kernels.paged_attention import paged_attention

_CPP = {}


@pytest.fixture(scope="module")
def cpp():
    """Build/load the extension once; skip (with the reason) if it cannot build here."""
    if "ok" not in _CPP:
        _CPP["ok"] = pa.cpp_available()
        info = pa.BUILD_INFO
        msg = (f"paged_attention C++ extension {'compiled (one-time JIT build)' if info.get('compiled') else 'loaded from cache'}"
               f" in {info.get('seconds', 0):.1f} s: {info.get('dir')}" if _CPP["ok"]
               else f"paged_attention C++ extension unavailable: {pa.cpp_error()}")
        warnings.warn(msg, UserWarning, stacklevel=1)  # shows in pytest's warnings summary
    if not _CPP["ok"]:
        pytest.skip(f"C++ extension cannot build: {pa.cpp_error()}")


@contextlib.contextmanager
def one_thread():
    """The oracles run thousands of tiny ops: with OpenMP threads on a shared, oversubscribed
    machine each op can wait a scheduler slice for a descheduled worker, so run them serially."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_batch(*a, **k):
    with one_thread():
        return _make_batch(*a, **k)


def _make_batch(seqs, H, KVH, D, bs, dtype, seed, shuffle_tokens=True, split_cache=False):
    """seqs: list of (context length L, new tokens n): the query tokens sit at positions L-n..L-1.

    Returns (args for paged_attention, per-sequence description for the HF-style oracle).
    """
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-L // bs) for L, _ in seqs]
    num_blocks = sum(nblk) + 5
    perm = torch.randperm(num_blocks, generator=g)
    width = max(nblk) + 2
    bt = torch.empty(len(seqs), width, dtype=torch.int32)
    bt[:, 0::2], bt[:, 1::2] = -7, num_blocks + 1000  # padding entries: garbage
    kv = torch.full((2, num_blocks * bs, KVH, D), float("nan"))  # unused slots: NaN
    i = 0
    for b, (L, _) in enumerate(seqs):
        bt[b, : nblk[b]] = perm[i: i + nblk[b]].to(torch.int32)
        i += nblk[b]
        for p in range(L):
            slot = int(bt[b, p // bs]) * bs + p % bs
            kv[:, slot] = torch.randn(2, KVH, D, generator=g)
    kv = kv.to(dtype)
    # [S, 2, KVH, D]: contiguous, or the [2, S, ...] per-layer cache of kv_cache.py as a view
    kv_cache = kv.transpose(0, 1) if split_cache else kv.transpose(0, 1).contiguous()
    tok = [(b, p) for b, (L, n) in enumerate(seqs) for p in range(L - n, L)]
    if shuffle_tokens:
        tok = [tok[j] for j in torch.randperm(len(tok), generator=g).tolist()]
    T = len(tok)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    token_seq = torch.tensor([b for b, _ in tok], dtype=torch.int32)
    token_ctx = torch.tensor([p + 1 for _, p in tok], dtype=torch.int32)
    return (q, kv_cache, bt, token_seq, token_ctx, bs, D ** -0.5), tok


def hf_style(args, tok, seqs, window=None, softcap=None):
    with one_thread():
        return _hf_style(args, tok, seqs, window, softcap)


def _hf_style(args, tok, seqs, window=None, softcap=None):
    """Independent oracle: per sequence, gather contiguous K/V, repeat_kv, causal mask, fp64 softmax.
    `window`: transformers' sliding overlay (key > query - window); `softcap`: Gemma 2's tanh cap."""
    q, kv_cache, bt, _, _, bs, scale = args
    T, H, D = q.shape
    KVH = kv_cache.shape[2]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for b, (L, _) in enumerate(seqs):
        rows = [i for i, (sb, _) in enumerate(tok) if sb == b]
        if not rows:
            continue
        slots = [int(bt[b, p // bs]) * bs + p % bs for p in range(L)]
        k = kv_cache[slots, 0].double().permute(1, 0, 2)  # [KVH, L, D]
        v = kv_cache[slots, 1].double().permute(1, 0, 2)
        k = k[:, None].expand(KVH, H // KVH, L, D).reshape(H, L, D)  # repeat_kv
        v = v[:, None].expand(KVH, H // KVH, L, D).reshape(H, L, D)
        qs = q[rows].double().permute(1, 0, 2)  # [H, n, D]
        pos = torch.tensor([tok[i][1] for i in rows])
        mask = torch.arange(L)[None, :] <= pos[:, None]  # causal
        if window is not None:
            mask &= torch.arange(L)[None, :] > pos[:, None] - window
        s = (qs @ k.transpose(1, 2)) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        out[rows] = (s.softmax(-1) @ v).permute(1, 0, 2)
    return out


def run(backend, args, out=None):
    q = args[0]
    if out is None:
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    with one_thread() if backend == "reference" else contextlib.nullcontext():
        res = paged_attention(*args, out=out, backend=backend)
    assert res is out
    return out


def check(out, ref, dtype):
    assert not out.isnan().any(), "NaN in output: unwritten element or read of an unused slot"
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-5, atol=2e-6)
    else:
        torch.testing.assert_close(out.double(), ref.double(), rtol=2e-2, atol=2e-2)


# (D, H, KVH, block_size): default model, MHA with block 1, MQA, GQA 4, odd D (vector tail)
SHAPES = [(64, 9, 3, 16), (80, 4, 4, 1), (128, 8, 1, 32), (64, 8, 2, 16), (36, 6, 2, 16)]
# decode at ctx 1 / 17 / 300, a first prefill chunk, a later chunk of a long sequence, one more decode
MIXED = [(1, 1), (17, 1), (300, 1), (41, 41), (300, 23), (64, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "D{}_H{}_KVH{}_bs{}".format(*s))
def test_mixed_batch_all_backends(cpp, shape, dtype):
    D, H, KVH, bs = shape
    args, tok = make_batch(MIXED, H, KVH, D, bs, dtype, seed=D * 100 + H * 10 + bs)
    ref = hf_style(args, tok, MIXED)
    r = run("reference", args)
    check(r, ref, dtype)
    for backend in ("cpp", "torch"):
        out = run(backend, args)
        check(out, ref, dtype)
        if dtype == torch.float32:  # the fast backends also agree with the per-token reference
            torch.testing.assert_close(out, r, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_context_split(cpp, dtype):
    """8k decode and a prefill chunk deep into a long sequence: exercises the split-and-merge path."""
    seqs = [(8192, 1), (4000, 8), (3, 1)]
    args, tok = make_batch(seqs, 8, 2, 64, 16, dtype, seed=7)
    ref = hf_style(args, tok, seqs)
    for backend in ("cpp", "torch"):
        check(run(backend, args), ref, dtype)
    for threads in (1, 3):  # the split plan depends on the thread count; results must not
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            check(run("cpp", args), ref, dtype)
        finally:
            torch.set_num_threads(before)


def test_long_prefill_tiles(cpp):
    """One sequence, 200 new tokens in arbitrary order: many tiles, causal ctx inside each."""
    seqs = [(200, 200)]
    args, tok = make_batch(seqs, 9, 3, 64, 16, torch.float32, seed=3)
    ref = hf_style(args, tok, seqs)
    check(run("cpp", args), ref, torch.float32)
    check(run("torch", args), ref, torch.float32)


def test_layouts_and_strided_views(cpp):
    """[2, S, KVH, D] cache passed transposed, non-contiguous q and out views, int64 index tensors."""
    seqs = [(33, 1), (70, 5), (9, 9)]
    args, tok = make_batch(seqs, 8, 2, 64, 16, torch.float32, seed=11, split_cache=True)
    assert not args[1].is_contiguous()
    ref = hf_style(args, tok, seqs)
    q, kv, bt, ts, tc, bs, scale = args
    q_big = torch.randn(q.shape[0], q.shape[1], 80)
    q_big[..., :64] = q
    q_view = q_big[..., :64]  # strided rows, contiguous last dim
    for backend in ("cpp", "torch", "auto"):
        out_big = torch.full((q.shape[0], q.shape[1], 70), float("nan"))
        out = out_big[..., 3:67]
        paged_attention(q_view, kv, bt.long(), ts.long(), tc.long(), bs, scale, out=out, backend=backend)
        check(out, ref, torch.float32)
        assert out_big[..., :3].isnan().all() and out_big[..., 67:].isnan().all()  # nothing outside `out`
        out_t = torch.full((q.shape[2], q.shape[1], q.shape[0]), float("nan")).permute(2, 1, 0)  # stride(-1) != 1
        paged_attention(q, kv, bt, ts, tc, bs, scale, out=out_t, backend=backend)
        check(out_t, ref, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference", "auto"])
def test_empty_batch(cpp, backend):
    args, _ = make_batch([(5, 1)], 4, 2, 64, 16, torch.float32, seed=1)
    q, kv, bt, _, _, bs, scale = args
    e = torch.empty(0, dtype=torch.int32)
    res = paged_attention(q[:0], kv, bt, e, e, bs, scale, backend=backend)
    assert res.shape == (0, 4, 64)
    out = torch.empty(0, 4, 64)
    assert paged_attention(q[:0], kv, bt, e, e, bs, scale, out=out, backend=backend) is out


def test_auto_returns_fresh_output_and_matches(cpp):
    args, tok = make_batch([(20, 1), (5, 2)], 9, 3, 64, 16, torch.bfloat16, seed=5)
    out = paged_attention(*args)
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    check(out, hf_style(args, tok, [(20, 1), (5, 2)]), torch.bfloat16)


def far_cache(dtype):
    """A cache of more than 2^32 elements (8 GiB at 16 bits, allocated but untouched: only the
    pages written are backed) with one sequence in its first blocks and one in the blocks at
    element offset 2^32: where an int32 offset wraps to, so int32 arithmetic reads the wrong K/V.
    (A 100 GiB cache on a GPU of a model with few kv heads is past 2^31 elements per layer.)"""
    bs, kvh, d = 16, 1, 16
    far = 2 ** 32 // (2 * kvh * d) // bs  # the first block at element offset 2^32
    kv = torch.empty((far + 3) * bs, 2, kvh, d, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    bt = torch.tensor([[far, far + 1], [0, 1]], dtype=torch.int32)
    for b in range(2):
        for p in range(20):
            kv[int(bt[b, p // bs]) * bs + p % bs] = torch.randn(2, kvh, d, generator=g)
    q = torch.randn(2, 2, d, generator=g).to(dtype)
    return q, kv, bt, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([20, 20], dtype=torch.int32), bs


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_offsets_past_int32(cpp, backend):
    q, kv, bt, seq, ctx, bs = far_cache(torch.bfloat16)
    ref = pa.paged_attention_reference(q, kv, bt, seq, ctx, bs, 0.25)
    out = paged_attention(q, kv, bt, seq, ctx, bs, 0.25, backend=backend)
    assert (out.float() - ref.float()).abs().max() < 2e-2


def test_cpp_rejects_bad_indices(cpp):
    args, _ = make_batch([(20, 1)], 4, 2, 64, 16, torch.float32, seed=2)
    q, kv, bt, ts, tc, bs, scale = args
    bad = bt.clone()
    bad[0, 0] = 10_000  # block id past the cache
    with pytest.raises(RuntimeError, match="block id out of range"):
        paged_attention(q, kv, bad, ts, tc, bs, scale, backend="cpp")
    with pytest.raises(RuntimeError, match="token_ctx exceeds"):
        paged_attention(q, kv, bt, ts, torch.tensor([bt.shape[1] * bs + 1], dtype=torch.int32), bs, scale, backend="cpp")
    with pytest.raises(RuntimeError, match="token_seq out of range"):
        paged_attention(q, kv, bt, torch.tensor([3], dtype=torch.int32), tc, bs, scale, backend="cpp")
    with pytest.raises(ValueError):
        paged_attention(q, kv, bt, ts, tc, bs, scale, backend="nope")


def test_build_failure_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    """A broken build (standing in for a missing compiler) logs one warning; auto still answers."""
    bad = tmp_path / "broken.cpp"
    bad.write_text("#error deliberately broken\n")
    monkeypatch.setattr(pa, "_SRC", bad)
    monkeypatch.setattr(pa, "_EXT", None)
    monkeypatch.setattr(pa, "_EXT_ERROR", None)
    monkeypatch.setattr(pa, "_isa", lambda: "broken_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    args, tok = make_batch([(10, 1), (4, 2)], 4, 2, 64, 16, torch.float32, seed=4)
    with caplog.at_level("WARNING", logger=pa.__name__):
        out = run("auto", args)
        run("auto", args)
    check(out, hf_style(args, tok, [(10, 1), (4, 2)]), torch.float32)
    warned = [r for r in caplog.records if "C++ extension unavailable" in r.getMessage()]
    assert len(warned) == 1  # once, not per call
    msg = warned[0].getMessage()  # the compiler's error line (or the missing tool) is in it
    assert "deliberately broken" in msg or "inja" in msg or "compiler" in msg.lower(), msg
    with pytest.raises(RuntimeError, match="unavailable"):
        run("cpp", args)


_LOAD = ("import json; from kernels import paged_attention as pa; ok = pa.load_cpp_extension() is not None; "
         "print(json.dumps(dict(ok=ok, error=pa.cpp_error(), compiled=pa.BUILD_INFO.get('compiled'))))")


@pytest.mark.slow
def test_first_starts_after_a_killed_build(tmp_path, monkeypatch):
    """The first build was killed mid-way (its `lock` file, made as torch's FileBaton makes it,
    is left in the build directory) and two servers then start at once on that cache: both load
    the extension within the deadline and it is compiled once (one fresh build, ~15-60 s).
    Before the build lock, both waited on the dead builder's `lock` forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = pa._build_dir(pa._isa())
    build_dir.mkdir(parents=True)
    baton = FileBaton(str(build_dir / "lock"))
    assert baton.try_acquire()
    os.close(baton.fd)  # the builder is gone; only the file stays
    runs = run_together([_LOAD, _LOAD], timeout_s=300, env=dict(os.environ))
    results = [r.result() for r in runs]
    assert all(r["ok"] for r in results), results
    assert sorted(r["compiled"] for r in results) == [False, True]
    assert not (build_dir / "lock").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_backend_on_cuda():
    seqs = MIXED
    args, tok = make_batch(seqs, 9, 3, 64, 16, torch.float32, seed=9)
    ref = hf_style(args, tok, seqs)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out = paged_attention(*cuda_args)  # auto on CUDA: the torch backend
    assert out.is_cuda
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)  # TF32-free SDPA, loose anyway


def test_concurrent_callers(cpp):
    """Python threads calling at once (the GIL is released): one gets the helper threads, the
    others run inline; every result is right."""
    import threading

    seqs = [(300, 1), (500, 1), (40, 8)]
    args, tok = make_batch(seqs, 9, 3, 64, 16, torch.float32, seed=12)
    ref = hf_style(args, tok, seqs)
    outs, errs = [None] * 6, []

    def call(i):
        try:
            for _ in range(20):
                outs[i] = run("cpp", args)
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs
    for o in outs:
        check(o, ref, torch.float32)


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 0.7), (16, 2.0), (1, None)])
def test_sliding_window_and_softcap(window, softcap):
    """The options the cpp kernel lacks: `auto` takes the torch path, and it, like the reference,
    matches the HF-style oracle (windows shorter and longer than a block, a prefill chunk, decodes)."""
    seqs = [(1, 1), (9, 1), (40, 40), (70, 12)]
    args, tok = make_batch(seqs, 8, 2, 32, 8, torch.float32, seed=5)
    ref = hf_style(args, tok, seqs, window, softcap)
    assert not torch.allclose(ref, hf_style(args, tok, seqs)), "the option changes the result"
    for backend in ("auto", "torch", "reference"):
        out = torch.full_like(args[0], float("nan"))
        with one_thread() if backend == "reference" else contextlib.nullcontext():
            paged_attention(*args, out=out, backend=backend, window=window, softcap=softcap)
        check(out, ref, torch.float32)
    with pytest.raises(ValueError, match="neither a sliding window nor soft-capping"):
        paged_attention(*args, backend="cpp", window=window, softcap=softcap)


def test_window_longer_than_every_context_keeps_the_cpp_path(cpp):
    """A window that masks nothing is dropped, so a long-window model (Phi-3: 2047) keeps the fast
    kernel for short contexts: with the torch backend monkeyed out, `auto` must still answer."""
    seqs = [(9, 1), (40, 40)]
    args, tok = make_batch(seqs, 8, 2, 32, 8, torch.float32, seed=6)
    ref = hf_style(args, tok, seqs)
    out = torch.full_like(args[0], float("nan"))
    saved = pa._paged_attention_torch
    pa._paged_attention_torch = None  # calling it would raise
    try:
        paged_attention(*args, out=out, window=40)
    finally:
        pa._paged_attention_torch = saved
    check(out, ref, torch.float32)
