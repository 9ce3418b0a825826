"""Rank-unit pages (kernels/pages.py): every LoRA op over a paged pool against today's reference
over the same adapters in a dense slot pool.

The dense pool is built first (random A/B per slot, mixed ranks, some not multiples of the page
rank u, zero past each rank), then scattered into a paged pool (tests/paged_pools.py): pages in
random order, spare pages, page-table entries past an adapter's pages and the rows of its last
page past its rank all hold large garbage (or another adapter's page), so anything read there
shows up. CPU: reference paths, and Triton through its interpreter at tiny shapes (as
tests/test_kernels.py). CUDA tests (real shapes, a captured graph) need a GPU.
"""

from __future__ import annotations

from triton_mode import CHILD, CUDA, kernel_module, rerun_in_child  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
from mixture_scenes import SCENES, check, make as make_scene, run_ref  # noqa: E402
from paged_pools import DTYPES, GARBAGE, Case, check_close, dense_pool, make, paginate, past_rank  # noqa: E402

from kernels import (add_lora, add_lora_dense, add_lora_mixed, add_lora_routed, add_lora_rows,  # noqa: E402
                     lora_expand, lora_shrink, reference, slot_a, slot_b)
from kernels.pages import slots_b_flat  # noqa: E402
from kernels.segments import fill_static, static_len, static_segments  # noqa: E402

triton_sgmv = kernel_module("triton_sgmv")
HAVE_TRITON = triton_sgmv is not None
INTERP = HAVE_TRITON and triton_sgmv.INTERPRETED


CASES = {
    # fused qkv (unequal outs), u=4 R=16, ranks 1,3,4,7,16 (and 0: an empty slot) in one step
    "qkv_u4": Case([5, 1, 3, 4, 7, 16, 0, 2], [3, 1, 17, 2, 5], [1, 2, 3, 4, 5], 4, 16, 24, [13, 7, 5]),
    # decode, one slice
    "o_u4_decode": Case([16, 1, 3, 7, 4, 2, 16], [1] * 6, [0, 1, 2, 3, 4, 6], 4, 16, 20, [21]),
    # every segment at full rank: the kernels skip no rows (min_rank == R)
    "gateup_full": Case([16, 3, 16, 16], [4, 9], [0, 2], 8, 16, 24, [9, 12], tail=0),
    # u=8 R=32: a rank chunk of the expand spans pages; ranks past one page
    "qkv_u8_r32": Case([5, 9, 17, 32, 8], [2, 20, 1, 4], [0, 1, 2, 3], 8, 32, 16, [8, 16, 8]),
    # u=2 R=8: shrink column blocks straddle slices; a long segment over several tiles
    "qkv_u2_long": Case([1, 8, 3, 6], [2, 37, 4], [0, 1, 3], 2, 8, 24, [7, 9, 6], tail=2),
    # pages of 16 (triton's default) at R=64: the expand reads one page per rank chunk (ONE_PAGE)
    "qkv_u16_r64": Case([16, 64, 5, 33, 48], [3, 2, 6, 1], [0, 1, 3, 4], 16, 64, 24, [16, 8, 8]),
}


def _paths(case: Case, dt, backend, seed, device="cpu"):
    wdt, xdt = DTYPES[dt]
    seg, x, y0, a_d, b_d, a_p, b_p, pages = make(case, wdt, xdt, seed=seed, device=device)
    y_ref, y = y0.clone(), y0.clone()
    reference.add_lora_ref(y_ref, x, a_d, b_d, seg, case.offsets)
    add_lora(y, x, a_p, b_p, seg, case.offsets, backend=backend, pages=pages)
    check_close(y, y_ref, y0, seg.num_tokens, loose=dt == "bf16")
    # the shrink alone into a poisoned buffer: h keeps the padded layout, exact 0 past each rank
    n_s = len(case.widths)
    h_ref = reference.lora_shrink_ref(x, a_d, seg, n_s)
    h = torch.full_like(h_ref, float("nan"))
    lora_shrink(x, a_p, seg, n_slices=n_s, backend=backend, out=h, pages=pages)
    pad = past_rank(seg, n_s, case.r_pad).to(device)
    assert torch.equal(h[pad], torch.zeros_like(h[pad]))
    assert (h - h_ref).norm() / h_ref.norm() < (1e-5 if dt == "fp32" else 1e-2)
    # the expand alone reads neither h columns past a segment's rank nor the pages there
    h_junk = h_ref.masked_fill(pad, GARBAGE)
    y_ref, y = y0.clone(), y0.clone()
    reference.lora_expand_ref(y_ref, h_ref, b_d, seg, case.offsets)
    lora_expand(y, h_junk, b_p, seg, case.offsets, backend=backend, pages=pages)
    check_close(y, y_ref, y0, seg.num_tokens, loose=dt == "bf16")


# ---------------------------------------------------------------- helpers and the paged reference

@pytest.mark.parametrize("name", list(CASES))
def test_slot_views_match_dense_pool(name):
    case = CASES[name]
    g = torch.Generator().manual_seed(1)
    a_d, b_d = dense_pool(case, g)
    n_s, R = len(case.widths), case.r_pad
    a_p, b_p, pages = paginate(a_d, b_d, case.slot_rank, n_s, case.u, g)
    slots = torch.tensor([3, 0, 1, 3])  # any order, repeats allowed
    va, vb, flat = slot_a(a_p, slots, pages, n_s), slot_b(b_p, slots, pages), slots_b_flat(b_p, slots, pages)
    assert va.shape == (4, n_s * R, case.in_dim) and vb.shape == (4, sum(case.widths), R)
    assert flat.shape == (sum(case.widths), 4 * R)
    for i, s in enumerate(slots.tolist()):
        r = case.slot_rank[s]
        assert torch.equal(va[i].view(n_s, R, -1)[:, :r], a_d[s].view(n_s, R, -1)[:, :r])
        assert torch.equal(vb[i, :, :r], b_d[s, :, :r])
        assert torch.equal(flat[:, i * R: i * R + r], b_d[s, :, :r])
    # unpaged: a plain gather of the slot pool
    assert torch.equal(slot_a(a_d, slots, None, n_s), a_d[slots])
    assert torch.equal(slot_b(b_d, slots, None), b_d[slots])
    assert torch.equal(slots_b_flat(b_d, slots, None), torch.cat(list(b_d[slots]), dim=1))


def test_slot_views_of_full_pages_are_exact():
    # every slot at full rank: the dense view is the slot pool, bit for bit
    case = CASES["qkv_u8_r32"]
    n_s, R = len(case.widths), case.r_pad
    g = torch.Generator().manual_seed(2)
    a_d, b_d = torch.randn(3, n_s * R, 16, generator=g), torch.randn(3, 32, R, generator=g)
    a_p, b_p, pages = paginate(a_d, b_d, [R] * 3, n_s, case.u, g)
    every = torch.arange(3)
    assert torch.equal(slot_a(a_p, every, pages, n_s), a_d)
    assert torch.equal(slot_b(b_p, every, pages), b_d)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_paged_reference_matches_dense(name, dt):
    _paths(CASES[name], dt, "reference", seed=3)


def test_validation():
    case = CASES["qkv_u4"]
    seg, x, y, a_d, b_d, a_p, b_p, pages = make(case, torch.float32, torch.float32, seed=4)
    offs, n_s = case.offsets, len(case.widths)
    for backend in ("torch", None):  # the CPU default is torch: unpaged only
        with pytest.raises(ValueError, match="unpaged"):
            add_lora(y, x, a_p, b_p, seg, offs, backend=backend, pages=pages)
    h = lora_shrink(x, a_p, seg, n_slices=n_s, backend="reference", pages=pages)
    assert h.shape == (seg.num_tokens, n_s * case.r_pad)
    with pytest.raises(ValueError, match="unpaged"):
        lora_expand(y, h, b_p, seg, offs, backend="torch", pages=pages)
    bad = {
        "int64": pages.long(),
        "too few slots": pages[:4],  # the step uses slot 5
        "not contiguous": pages.t().contiguous().t(),
        "1-d": pages.view(-1),
    }
    for why, p in bad.items():
        with pytest.raises(ValueError):
            lora_shrink(x, a_p, seg, n_slices=n_s, backend="reference", pages=p)
        with pytest.raises(ValueError):
            lora_expand(y, h, b_p, seg, offs, backend="reference", pages=p)
    with pytest.raises(ValueError, match="n_slices"):
        lora_shrink(x, a_p, seg, backend="reference", pages=pages)
    with pytest.raises(ValueError, match="h must be"):  # h of another page count
        lora_expand(y, h, b_p, seg, offs, backend="reference", pages=pages[:, :2].contiguous())
    with pytest.raises(ValueError, match="exceeds"):  # rank 16 > R = 4 * 2
        lora_shrink(x, a_p, seg, n_slices=n_s, backend="reference", pages=pages[:, :2].contiguous())
    with pytest.raises(ValueError, match="slot_ranks"):
        add_lora_dense(y, x, a_p, b_p, offs, torch.tensor([0]), torch.tensor([1]), torch.ones(1, 1, 1),
                       pages=pages)


# ---------------------------------------------------------------- mixtures: paged == unpaged

def _ranks(sc):
    return [sc.ranks.get(s, 0) for s in range(sc.num_slots)]


def run_paged(t, y, offsets, backend, a, b, pages, slot_ranks):
    """tests/mixture_scenes.run_fast over the paged pool."""
    if t.rows is None:
        add_lora(y, t.x, a, b, t.seg, offsets, backend=backend, pages=pages)
    else:
        add_lora_rows(y, t.x, a, b, t.seg, offsets, t.rows, t.protos, t.valid, backend=backend, pages=pages)
    if t.mixed is not None:
        add_lora_mixed(y, t.x, a, b, offsets, t.mixed, pages=pages, slot_ranks=slot_ranks)
    if t.dense is not None:
        add_lora_routed(y, t.x, a, b, offsets, t.dense, t.protos, t.valid, pages=pages, slot_ranks=slot_ranks)


def _mixture(name, dt, mode, backend, seed):
    sc = SCENES[name]
    t = make_scene(sc, DTYPES[dt][0], seed=seed, mode=mode)
    g = torch.Generator().manual_seed(seed)
    a_p, b_p, pages = paginate(t.a, t.b, _ranks(sc), len(sc.widths), 4 if sc.r_pad == 8 else 8, g)
    assert mode != "dense" or t.mixed is not None and t.dense is not None
    y_ref, y = t.y.clone(), t.y.clone()
    run_ref(t, y_ref, sc.offsets)
    run_paged(t, y, sc.offsets, backend, a_p, b_p, pages, torch.tensor(_ranks(sc), dtype=torch.int32))
    check(y, y_ref, t.y, sc, loose=dt == "bf16")


@pytest.mark.parametrize("mode", ["dense", "rows"])
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_mixtures_paged_reference(name, dt, mode):
    _mixture(name, dt, mode, "reference", seed=5)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_dense_experts_paged_equal_unpaged(dt):
    # add_lora_dense itself (no segment table): the same experts from the paged and the dense pool
    case = CASES["qkv_u4"]
    wdt, _ = DTYPES[dt]
    seg, x, y0, a_d, b_d, a_p, b_p, pages = make(case, wdt, wdt, seed=6)
    tokens, experts = torch.tensor([0, 4, 7, 2]), torch.tensor([1, 2, 3, 5, 7])
    weight = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(6))
    y1, y2 = y0.clone(), y0.clone()
    add_lora_dense(y1, x, a_d, b_d, case.offsets, tokens, experts, weight)
    add_lora_dense(y2, x, a_p, b_p, case.offsets, tokens, experts, weight, pages=pages,
                   slot_ranks=torch.tensor(case.slot_rank))
    rows = tokens.tolist()
    assert not torch.equal(y1[rows], y0[rows])
    other = [i for i in range(y0.shape[0]) if i not in rows]
    assert torch.equal(y2[other], y0[other])
    assert torch.allclose(y2.float(), y1.float(), rtol=1e-5, atol=1e-5 if dt == "fp32" else 0.1)


# ---------------------------------------------------------------- Triton, interpreter on CPU

needs_interp = pytest.mark.skipif(not INTERP, reason="Triton interpreter not active in-process")


@needs_interp
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_triton_interp_paged_matches_dense(name, dt):
    _paths(CASES[name], dt, "triton", seed=7)


@needs_interp
@pytest.mark.parametrize("cfg", [(16, 16, 16, 1), (32, 16, 16, 2), (16, 32, 32, 3)])
def test_triton_interp_paged_configs(cfg):
    # explicit tiles: split-K (atomics), column blocks across slices and pages, rank chunks over pages
    bm, bn, bk, split = cfg
    case = CASES["qkv_u8_r32"]
    seg, x, y0, a_d, b_d, a_p, b_p, pages = make(case, torch.float32, torch.float32, seed=8)
    h_ref = reference.lora_shrink_ref(x, a_d, seg, 3)
    h = torch.full_like(h_ref, float("nan"))
    triton_sgmv.sgmv_shrink(x, a_p, seg, 3, out=h, pages=pages,
                            config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split))
    assert (h - h_ref).norm() / h_ref.norm() < 1e-5
    y_ref, y = y0.clone(), y0.clone()
    reference.lora_expand_ref(y_ref, h_ref, b_d, seg, case.offsets)
    triton_sgmv.sgmv_expand(y, h_ref, b_p, seg, case.offsets, pages=pages,
                            config=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
    check_close(y, y_ref, y0, seg.num_tokens, loose=False)


@needs_interp
def test_triton_interp_paged_static_table():
    # the CUDA-graph decode path: a static table (min_rank 0, no host tuples), padded rows untouched
    case = CASES["o_u4_decode"]
    seg, x, y0, a_d, b_d, a_p, b_p, pages = make(case, torch.float32, torch.float32, seed=9)
    size = 8
    host = [0] * static_len(size)
    fill_static(host, 0, size, case.lens, case.slots, [case.slot_rank[s] for s in case.slots])
    st = static_segments(torch.tensor(host, dtype=torch.int32), size, len(case.slot_rank))
    xs = torch.cat([x[:6], torch.randn(2, case.in_dim)])
    ys0 = torch.cat([y0[:6], torch.randn(2, y0.shape[1])])
    R, widths = case.r_pad, case.widths
    shrink = triton_sgmv.shrink_config(st, case.in_dim, R, 4)
    expand = triton_sgmv.expand_config(st, R, widths)
    h = triton_sgmv.sgmv_shrink(xs, a_p, st, 1, config=shrink, pages=pages)
    ys = ys0.clone()
    triton_sgmv.sgmv_expand(ys, h, b_p, st, case.offsets, config=expand, pages=pages)
    y_ref = y0.clone()
    reference.add_lora_ref(y_ref, x, a_d, b_d, seg, case.offsets)
    check_close(ys[:6], y_ref[:6], ys0[:6], 6, loose=False)
    assert torch.equal(ys[6:], ys0[6:])


@needs_interp
@pytest.mark.parametrize("mode", ["dense", "rows"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_triton_interp_mixtures_paged(dt, mode):
    _mixture("qkv_mixed", dt, mode, "triton", seed=10)


@pytest.mark.skipif(INTERP or CUDA or not HAVE_TRITON or CHILD,
                    reason="interpreter tests already ran in-process (or no triton)")
def test_triton_interp_in_subprocess():
    rerun_in_child(__file__)  # triton was imported before this module could switch the interpreter on


# ---------------------------------------------------------------- CUDA (real shapes, a captured graph)

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def cuda_case(in_dim, widths, lens, u, r_pad, num_slots, seed) -> Case:
    g = torch.Generator().manual_seed(seed)
    slot_rank = torch.randint(1, r_pad + 1, (num_slots,), generator=g).tolist()
    slot_rank[0] = r_pad
    slots = sorted(torch.randperm(num_slots, generator=g)[:len(lens)].tolist())
    return Case(slot_rank, lens, slots, u, r_pad, in_dim, widths, tail=7)


CUDA_SHAPES = [
    # (in, widths, lens, u, R, slots): SmolLM2-like qkv at decode; 7B qkv decode + a prefill
    # (split-K shrink); 7B down with in=11008; gate_up with R=64 over 8-rank pages
    (576, [576, 192, 192], [1] * 48, 4, 16, 64),
    (4096, [4096, 1024, 1024], [1] * 16 + [300], 8, 16, 32),
    (11008, [4096], [3, 90, 1], 16, 64, 16),
    (576, [1536, 1536], [1] * 32, 8, 64, 64),
    # a rank-8 pool (--max-lora-rank 8: pages of 8, R 8): h narrower than one 16-column block
    (4096, [4096, 1024, 1024], [1] * 8 + [40], 8, 8, 16),
]


@needs_cuda
@pytest.mark.parametrize("idx", range(len(CUDA_SHAPES)))
def test_cuda_paged_matches_dense(idx):
    _paths(cuda_case(*CUDA_SHAPES[idx], seed=idx), "bf16", "triton", seed=20 + idx, device="cuda")


@needs_cuda
def test_cuda_graph_replays_follow_the_page_table():
    # one captured decode graph over a persistent page table: pages, weights and table rewritten in
    # place between replays (other adapters, other pages) and every replay matches the reference
    case = cuda_case(576, [576, 192, 192], [1] * 12, 4, 16, 24, seed=5)
    size, n_s, dev = 16, 3, "cuda"
    seg, x, y0, a_d, b_d, a_p, b_p, pages = make(case, torch.bfloat16, torch.bfloat16, seed=30, device=dev)
    table = torch.zeros(static_len(size), dtype=torch.int32, device=dev)
    st = static_segments(table, size, len(case.slot_rank))
    xs = torch.zeros(size, case.in_dim, dtype=torch.bfloat16, device=dev)
    ys = torch.zeros(size, sum(case.widths), dtype=torch.bfloat16, device=dev)
    h = torch.zeros(size, n_s * case.r_pad, device=dev)
    shrink = triton_sgmv.shrink_config(st, case.in_dim, n_s * case.r_pad, 2)
    expand = triton_sgmv.expand_config(st, case.r_pad, case.widths)

    def step():
        triton_sgmv.sgmv_shrink(xs, a_p, st, n_s, out=h, config=shrink, pages=pages)
        triton_sgmv.sgmv_expand(ys, h, b_p, st, case.offsets, config=expand, pages=pages)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (30, 31):
        seg, x, y0, a_d, b_d, a2, b2, p2 = make(case, torch.bfloat16, torch.bfloat16, seed=seed, device=dev)
        assert a2.shape == a_p.shape  # same ranks: the same number of pages, in another order
        a_p.copy_(a2)
        b_p.copy_(b2)
        pages.copy_(p2)
        host = [0] * static_len(size)
        fill_static(host, 0, size, case.lens, case.slots, [case.slot_rank[s] for s in case.slots])
        table.copy_(torch.tensor(host, dtype=torch.int32))
        nt = seg.num_tokens
        xs[:nt].copy_(x[:nt])
        ys.zero_()
        ys[:nt].copy_(y0[:nt])
        graph.replay()
        torch.cuda.synchronize()
        y_ref = y0.clone()
        reference.add_lora_ref(y_ref, x, a_d, b_d, seg, case.offsets)
        check_close(ys[:nt], y_ref[:nt], y0[:nt], nt, loose=True)
        assert torch.equal(ys[nt:], torch.zeros_like(ys[nt:]))
