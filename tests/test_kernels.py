"""Segmented LoRA ops: every fast path against kernels/reference.py, the oracle against an
independent dense formulation. Fresh random inputs, poisoned outputs, odd sizes.

CPU: reference / torch paths, and Triton through its interpreter at tiny shapes (this module
sets TRITON_INTERPRET=1 before triton is imported; if triton was imported earlier in the same
process, the interpreter tests rerun themselves in a subprocess). CUDA tests need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

from triton_mode import CHILD, CUDA, kernel_module, rerun_in_child  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import LoraSegments, add_lora, lora_expand, lora_shrink  # noqa: E402
from kernels import reference, torch_ops  # noqa: E402

triton_sgmv = kernel_module("triton_sgmv")
HAVE_TRITON = triton_sgmv is not None
INTERP = HAVE_TRITON and triton_sgmv.INTERPRETED


@dataclass
class Case:
    lens: list
    slots: list
    ranks: list
    num_slots: int
    r_pad: int
    in_dim: int
    widths: list
    tail: int = 3  # base-only rows after the LoRA tokens

    @property
    def offsets(self):
        return tuple(accumulate(self.widths, initial=0))


CASES = {
    # fused qkv, odd in/out (torch path falls back to gather), gaps in slots, mixed ranks
    "qkv_odd": Case([5, 1, 17, 2], [1, 3, 4, 6], [8, 3, 5, 1], 8, 8, 37, [13, 7, 7]),
    # fused gate_up, 16-byte aligned (torch path uses grouped_mm)
    "gateup_aligned": Case([9, 4], [0, 5], [8, 2], 6, 8, 40, [24, 24], tail=0),
    # decode: single-token segments, o_proj-like, width not a multiple of anything
    "decode_o": Case([1] * 6, [0, 2, 3, 5, 6, 7], [8, 8, 2, 8, 4, 8], 9, 8, 48, [33]),
    # one long segment spanning several 16-token tiles, 1 slice, full rank, slot not 0
    "prefill_long": Case([37], [2], [16], 3, 16, 64, [40], tail=5),
}


def _spread(n: int, pool: int, lens, seed: int) -> Case:
    """n adapters of mixed ranks spread over a large pool: the compact (gathered) layout."""
    g = torch.Generator().manual_seed(seed)
    slots = sorted(torch.randperm(pool, generator=g)[:n].tolist())
    ranks = torch.randint(1, 9, (n,), generator=g).tolist()
    return Case(list(lens), slots, ranks, pool, 8, 32, [16, 8, 8])


# many distinct adapters in one call, spread over a pool 4-5x larger: decode (padded, gathered
# weights) and uneven prefill chunks (grouped_mm over the gathered weights)
CASES["many_spread_decode"] = _spread(48, 200, [1] * 48, seed=11)
CASES["many_spread_prefill"] = _spread(40, 200, [1 + i % 3 for i in range(39)] + [50], seed=12)


def make(case: Case, wdtype, xdtype, device="cpu", seed=0):
    """Random inputs honouring the pool contract: each active slot zero-padded past its rank;
    inactive slots hold large random values so a wrong slot shows up loudly."""
    g = torch.Generator().manual_seed(seed)
    n_sl = len(case.widths)
    out_total = sum(case.widths)
    seg = LoraSegments.build(case.lens, case.slots, case.ranks, case.num_slots, device)
    t = seg.num_tokens + case.tail
    x = torch.randn(t, case.in_dim, generator=g)
    a = torch.randn(case.num_slots, n_sl * case.r_pad, case.in_dim, generator=g) * 5
    b = torch.randn(case.num_slots, out_total, case.r_pad, generator=g) * 5
    for s, r in zip(case.slots, case.ranks):
        a[s] = torch.randn(n_sl * case.r_pad, case.in_dim, generator=g) / case.in_dim ** 0.5
        b[s] = torch.randn(out_total, case.r_pad, generator=g) / max(r, 1) ** 0.5
        for j in range(n_sl):
            a[s, j * case.r_pad + r:(j + 1) * case.r_pad] = 0
        b[s, :, r:] = 0
    y = torch.randn(t, out_total, generator=g)
    cv = lambda v, dt: v.to(device=device, dtype=dt)  # noqa: E731
    return seg, cv(x, xdtype), cv(a, wdtype), cv(b, wdtype), cv(y, xdtype)


def check_close(out, ref, y0, nt, dtype):
    """Relative error of the LoRA rows, and an exact check that base-only rows are untouched."""
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite elements"
    assert torch.equal(out[nt:], y0[nt:]), "base-only tail rows were modified"
    delta = (ref[:nt].double() - y0[:nt].double()).norm()
    assert delta > 0.1 * y0[:nt].double().norm() or nt == 0, "test is vacuous: tiny delta"
    err = (out[:nt].double() - ref[:nt].double()).norm() / ref[:nt].double().norm().clamp_min(1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert err < tol, f"relative error {err:.3g} >= {tol}"


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "x_fp32_w_bf16": (torch.bfloat16, torch.float32)}


# ---------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_reference_matches_dense_einsum(name, dt):
    wdt, xdt = DTYPES[dt]
    seg, x, a, b, y0 = make(CASES[name], wdt, xdt, seed=1)
    y_ref, y_dense = y0.clone(), y0.clone()
    reference.add_lora_ref(y_ref, x, a, b, seg, CASES[name].offsets)
    reference.add_lora_dense(y_dense, x, a, b, seg, CASES[name].offsets)
    check_close(y_ref, y_dense, y0, seg.num_tokens, xdt)


def test_reference_ignores_rank_padding():
    # the rank-limited oracle must not read padded rows: garbage there changes nothing
    c = CASES["qkv_odd"]
    seg, x, a, b, y0 = make(c, torch.float32, torch.float32, seed=2)
    y1 = y0.clone()
    reference.add_lora_ref(y1, x, a, b, seg, c.offsets)
    a2, b2 = a.clone(), b.clone()
    for s, r in zip(c.slots, c.ranks):
        b2[s, :, r:] = 7.0
        for j in range(len(c.widths)):
            a2[s, j * c.r_pad + r:(j + 1) * c.r_pad] = 7.0
    y2 = y0.clone()
    reference.add_lora_ref(y2, x, a2, b2, seg, c.offsets)
    assert torch.equal(y1, y2)


# ---------------------------------------------------------------- segment table

def test_build_fields():
    seg = LoraSegments.build([3, 1, 5], [2, 4, 5], [8, 4, 2], 7, "cpu")
    assert seg.starts.tolist() == [0, 3, 4, 9]
    assert seg.slots.tolist() == [2, 4, 5] and seg.ranks.tolist() == [8, 4, 2]
    assert seg.slot_offsets.tolist() == [0, 0, 3, 3, 4, 9, 9]
    assert seg.token_slots.tolist() == [2, 2, 2, 4, 5, 5, 5, 5, 5]
    assert (seg.num_tokens, seg.max_seg_len, seg.max_rank, seg.min_rank) == (9, 5, 8, 2)
    assert all(t.dtype == torch.int32 for t in (seg.starts, seg.slots, seg.ranks, seg.tiles))
    pairs, n = seg.tile_range(16)
    assert n == 3 and pairs.view(-1, 2).tolist() == [[0, 0], [1, 3], [2, 4]]
    long = LoraSegments.build([40, 2], [0, 1], [4, 4], 2, "cpu")
    pairs, n = long.tile_range(16)
    assert pairs.view(-1, 2).tolist() == [[0, 0], [0, 16], [0, 32], [1, 40]]


def test_build_padded_layout():
    # window slots 2..5 (4 wide) x longest segment 2 = 8 rows for 5 tokens: within 2x
    seg = LoraSegments.build([2, 1, 2], [2, 3, 5], [8, 8, 8], 7, "cpu")
    assert seg.pad_rows.tolist() == [0, 1, 2, 0, 0, 0, 3, 4]  # slot 4 is empty: padding rows
    assert seg.pad_valid.tolist() == [0, 1, 2, 6, 7]
    # the padding counted is the segments' own (3 x 2 rows for 5 tokens), not the idle slot 4
    assert LoraSegments.build([2, 1, 2], [2, 3, 5], [8, 8, 8], 7, "cpu", max_padding=1.2).pad_rows is not None
    assert LoraSegments.build([2, 1, 2], [2, 3, 5], [8, 8, 8], 7, "cpu", max_padding=1.1).pad_rows is None


@pytest.mark.parametrize("args", [
    ([0], [1], [4]),            # empty segment
    ([2, 2], [3, 1], [4, 4]),   # slots not ascending
    ([2, 2], [1, 1], [4, 4]),   # slot repeated
    ([2], [9], [4]),            # slot out of pool
    ([2], [1], [-1]),           # negative rank
    ([2, 3], [1], [4]),         # ragged lists
])
def test_build_rejects(args):
    with pytest.raises(ValueError):
        LoraSegments.build(*args, num_slots=4, device="cpu")


BACKENDS_HERE = ["reference", "torch"] + (["triton"] if INTERP or CUDA else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_empty_table_is_noop(backend):
    dev = "cuda" if CUDA and backend == "triton" else "cpu"
    seg = LoraSegments.empty(4, dev)
    x, y = torch.randn(5, 16, device=dev), torch.randn(5, 24, device=dev)
    a, b = torch.randn(4, 16, 16, device=dev), torch.randn(4, 24, 8, device=dev)
    y0 = y.clone()
    add_lora(y, x, a, b, seg, (0, 8, 24), backend=backend)
    assert torch.equal(y, y0)
    h = lora_shrink(x, a, seg, n_slices=2, backend=backend)
    assert h.shape == (0, 16) and h.dtype == torch.float32
    lora_expand(y, h, b, seg, (0, 8, 24), backend=backend)
    assert torch.equal(y, y0)


def test_rank_above_pool_is_rejected():
    seg = LoraSegments.build([2], [0], [9], 2, "cpu")
    with pytest.raises(ValueError):
        lora_shrink(torch.randn(2, 8), torch.randn(2, 8, 8), seg, backend="torch")


# ---------------------------------------------------------------- torch (CPU fast path)

def _run_paths(case, dt, backend, seed, device="cpu"):
    wdt, xdt = DTYPES[dt]
    seg, x, a, b, y0 = make(case, wdt, xdt, device=device, seed=seed)
    y_ref = y0.clone()
    reference.add_lora_ref(y_ref, x, a, b, seg, case.offsets)
    y = y0.clone()
    add_lora(y, x, a, b, seg, case.offsets, backend=backend)
    loose = torch.bfloat16 if torch.bfloat16 in (wdt, xdt) else torch.float32
    check_close(y, y_ref, y0, seg.num_tokens, loose)
    # shrink alone, into a poisoned buffer: every element (padded ranks too) must be written
    n_sl = len(case.widths)
    h = torch.full((seg.num_tokens, a.shape[1]), float("nan"), device=device)
    lora_shrink(x, a, seg, n_slices=n_sl, backend=backend, out=h)
    h_ref = reference.lora_shrink_ref(x, a, seg, n_sl)
    assert torch.isfinite(h).all()
    tol = 1e-5 if wdt == torch.float32 else 1e-2
    assert ((h - h_ref).norm() / h_ref.norm()) < tol


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_torch_path_matches_reference(name, dt):
    _run_paths(CASES[name], dt, "torch", seed=3)


def test_spread_adapters_take_the_compact_layout():
    # the kernels run over the S active slots (gathered), not the idle pool window between them
    def table(c: Case) -> LoraSegments:
        return LoraSegments.build(c.lens, c.slots, c.ranks, c.num_slots, "cpu")

    decode = table(CASES["many_spread_decode"])
    assert decode.compact and decode.pad_rows is not None and decode.pad_rows.numel() == 48
    prefill = table(CASES["many_spread_prefill"])
    assert prefill.compact and prefill.pad_rows is None  # uneven: grouped_mm
    dense = LoraSegments.build([1] * 4, [2, 3, 4, 5], [8] * 4, 200, "cpu")
    assert not dense.compact and dense.pad_rows.numel() == 4  # a dense window stays a view


@pytest.mark.parametrize("impl", ["grouped", "grouped_window", "gather", "padded", "padded_window"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_torch_variants_directly(impl, dt):
    # every formulation, whichever the dispatcher would pick for these strides and this padding:
    # slots 0 and 11 of 12 make the window mostly idle, so the default table is compact (gathered
    # weights); the *_window variants run over the window view instead
    c = replace(CASES["gateup_aligned"], slots=[0, 11], num_slots=12)
    wdt, xdt = DTYPES[dt]
    seg, x, a, b, y0 = make(c, wdt, xdt, seed=4)
    assert seg.compact
    if impl.endswith("_window"):
        seg = LoraSegments.build(c.lens, c.slots, c.ranks, c.num_slots, "cpu", max_padding=float("inf"),
                                 window_only=True)
        assert not seg.compact and seg.pad_rows is not None
    impl = impl.removesuffix("_window")
    if impl == "padded":
        assert seg.pad_rows is not None  # 2 compact entries x 9 rows for 13 tokens: within 2x
    shrink, expand = {"grouped": (torch_ops.grouped_shrink, torch_ops.grouped_expand),
                      "gather": (torch_ops.gather_shrink, torch_ops.gather_expand),
                      "padded": (torch_ops.padded_shrink, torch_ops.padded_expand)}[impl]
    if impl == "grouped":
        if not torch_ops.grouped_mm_available("cpu", wdt):
            pytest.skip("this torch has no CPU grouped_mm")
        assert torch_ops._gmm_ok(x, a.transpose(1, 2)), "case should be grouped_mm-eligible"
    y_ref = y0.clone()
    reference.add_lora_ref(y_ref, x, a, b, seg, c.offsets)
    y = y0.clone()
    expand(y, shrink(x, a, seg), b, seg, c.offsets)
    check_close(y, y_ref, y0, seg.num_tokens, xdt)


# ---------------------------------------------------------------- Triton, interpreter on CPU

needs_interp = pytest.mark.skipif(not INTERP, reason="Triton interpreter not active in-process")


@needs_interp
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_triton_interp_matches_reference(name, dt):
    _run_paths(CASES[name], dt, "triton", seed=5)


@needs_interp
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("bm", [16, 32])
def test_triton_interp_configs(split, bm):
    # explicit launch configs: split-K (atomic accumulation) and other tile heights
    c = CASES["qkv_odd"]
    seg, x, a, b, y0 = make(c, torch.float32, torch.float32, seed=6)
    h_ref = reference.lora_shrink_ref(x, a, seg, 3)
    h = torch.full_like(h_ref, float("nan"))
    triton_sgmv.sgmv_shrink(x, a, seg, 3, out=h, config=dict(
        BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16, SPLIT_K=split))
    assert ((h - h_ref).norm() / h_ref.norm()) < 1e-5
    y_ref, y = y0.clone(), y0.clone()
    reference.lora_expand_ref(y_ref, h_ref, b, seg, c.offsets)
    triton_sgmv.sgmv_expand(y, h_ref, b, seg, c.offsets,
                            config=dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16))
    check_close(y, y_ref, y0, seg.num_tokens, torch.float32)


@pytest.mark.skipif(INTERP or CUDA or not HAVE_TRITON or CHILD,
                    reason="interpreter tests already ran in-process (or no triton)")
def test_triton_interp_in_subprocess():
    rerun_in_child(__file__)  # triton was imported before this module could switch the interpreter on


# ---------------------------------------------------------------- CUDA (real shapes)

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

SMALL = dict(hidden=576, q=576, kv=192, inter=1536)
BIG = dict(hidden=4096, q=4096, kv=1024, inter=11008)


def layer_case(model, layer, lens, ranks, r_pad, num_slots, seed):
    in_dim, widths = {
        "qkv": (model["hidden"], [model["q"], model["kv"], model["kv"]]),
        "o": (model["q"], [model["hidden"]]),
        "gate_up": (model["hidden"], [model["inter"], model["inter"]]),
        "down": (model["inter"], [model["hidden"]]),
    }[layer]
    g = torch.Generator().manual_seed(seed)
    slots = sorted(torch.randperm(num_slots, generator=g)[:len(lens)].tolist())
    return Case(lens, slots, ranks, num_slots, r_pad, in_dim, widths, tail=7)


def _mixed(n, r_pad, g):
    return [int(v) for v in torch.randint(1, r_pad + 1, (n,), generator=g)]


CUDA_SHAPES = [
    # (model, layer, lens, r_pad, num_slots)
    ("small", "qkv", [1] * 48, 16, 64),                  # pure decode, many slots
    ("small", "gate_up", [200, 1, 1, 57, 1, 3], 16, 8),  # prefill + decode mix
    ("small", "down", [513], 64, 4),                     # one long segment, big rank
    ("big", "qkv", [1] * 16 + [300], 16, 32),            # decode + one prefill, split-K shrink
    ("big", "o", [64] * 8, 64, 8),
    ("big", "down", [3, 90, 1], 16, 16),                 # in=11008
    ("big", "gate_up", [1] * 32, 64, 64),
]


@needs_cuda
@pytest.mark.parametrize("idx", range(len(CUDA_SHAPES)))
@pytest.mark.parametrize("dt", ["bf16", "fp32"])
@pytest.mark.parametrize("rank_mode", ["mixed", "full"])
def test_cuda_triton_matches_reference(idx, dt, rank_mode):
    model, layer, lens, r_pad, n = CUDA_SHAPES[idx]
    g = torch.Generator().manual_seed(idx)
    ranks = _mixed(len(lens), r_pad, g) if rank_mode == "mixed" else [r_pad] * len(lens)
    case = layer_case(SMALL if model == "small" else BIG, layer, lens, ranks, r_pad, n, seed=idx)
    _run_paths(case, dt, "triton", seed=10 + idx, device="cuda")


@needs_cuda
@pytest.mark.parametrize("cfg", [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3),
])
def test_cuda_shrink_configs(cfg):
    case = layer_case(BIG, "qkv", [1, 40, 7, 100], [16, 5, 16, 9], 16, 8, seed=0)
    seg, x, a, b, y0 = make(case, torch.bfloat16, torch.bfloat16, device="cuda", seed=0)
    h_ref = reference.lora_shrink_ref(x, a, seg, 3)
    h = torch.full_like(h_ref, float("nan"))
    triton_sgmv.sgmv_shrink(x, a, seg, 3, out=h, config=cfg)
    assert ((h - h_ref).norm() / h_ref.norm()) < 1e-2


@needs_cuda
def test_cuda_default_dispatch_is_triton():
    case = layer_case(SMALL, "o", [5, 9], [16, 16], 16, 4, seed=1)
    seg, x, a, b, y0 = make(case, torch.bfloat16, torch.bfloat16, device="cuda", seed=1)
    y1, y2 = y0.clone(), y0.clone()
    add_lora(y1, x, a, b, seg, case.offsets)
    add_lora(y2, x, a, b, seg, case.offsets, backend="triton")
    assert torch.equal(y1, y2)


@needs_cuda
def test_cuda_step_tables_upload_without_host_sync():
    # an eager step uploads its segment table (and row plan, DoRA tokens, attention tiles) while
    # the previous work is still queued: a copy from pageable memory would wait for all of it
    from kernels import DoraTokens, RowPlan
    from kernels.triton_paged_attention import query_tiles

    def tables():
        seg = LoraSegments.build([3, 1, 40], [1, 4, 6], [16, 8, 4], 8, "cuda")
        plan = RowPlan()
        plan.add(2, 0, 3)
        plan.add_mixture([1, 4], [0.5, 0.5], 3, 2)
        rows = plan.build("cuda")
        dora = DoraTokens.build([0, 2], [1, 1], "cuda")
        tiles = query_tiles([1, 6, 5], 4, "cuda")
        return seg, rows, dora, tiles

    tables()  # first pinned blocks: allocated outside the check
    torch.cuda.synchronize()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 64  # keep the stream busy while the tables go up
    torch.cuda.set_sync_debug_mode("error")
    try:
        seg, rows, dora, tiles = tables()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seg.starts.tolist() == [0, 3, 4, 44] and seg.ranks.tolist() == [16, 8, 4]
    assert tiles.tolist() == [[0, 1], [1, 4], [5, 2], [7, 4], [11, 1]]
    assert dora.token.tolist() == [0, 2] and dora.slot.tolist() == [1, 1]
    assert rows.seg_slots == [2] and rows.mixed.tokens.tolist() == [3, 4] and rows.mixed.experts.tolist() == [1, 4]
