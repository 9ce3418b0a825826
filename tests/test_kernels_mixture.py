"""LoRA over rows (mixtures, Arrow routing) and the DoRA rescale: the fast paths (torch, Triton
under its interpreter on CPU) against kernels/reference.py, and the oracle against independent
checks: a float64 dense sum of w_i B_i A_i x for single adapters and mixtures, PEFT's own
ArrowLoraLinearLayer.forward for routed tokens, the DoRA formula with the base weight for DoRA.

Batches mix single-adapter, mixture, routed and base-only tokens, experts of different ranks,
1 to 3 fused slices, experts that do not target a slice (no routing there), fp32 and bf16;
routed tokens both ways (dense against every routing expert, or as LoRA rows).
"""

from __future__ import annotations

from triton_mode import CHILD, CUDA, rerun_in_child  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
from mixture_scenes import (DTYPES, MODES, SCENES, Scene, check, dense_expected, make, run_fast,  # noqa: E402
                            run_ref)

from kernels import (LoraSegments, RouteTable, RowPlan, add_lora, add_lora_rows, arrow_weights,  # noqa: E402
                     dora_rescale, reference)

try:
    from kernels import triton_sgmv
    INTERP = triton_sgmv.INTERPRETED
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton missing entirely
    INTERP = HAVE_TRITON = False


# ---------------------------------------------------------------- the oracles themselves

@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_reference_matches_dense_and_peft(name, dt, mode):
    sc = SCENES[name]
    t = make(sc, DTYPES[dt], seed=1, mode=mode)
    assert (t.dense is not None) == (mode == "dense") and (t.rows.route is not None) == (mode == "rows")
    assert (t.mixed is not None) == (mode == "dense")
    y = t.y.clone()
    run_ref(t, y, sc.offsets)
    check(y, dense_expected(sc, t), t.y, sc, loose=dt == "bf16")


@pytest.mark.parametrize("name", list(SCENES))
def test_arrow_weights_match_reference(name):
    sc = SCENES[name]
    t = make(sc, torch.float32, seed=2)
    route = t.dense
    w = arrow_weights(t.x, t.protos, t.valid, route)
    w_ref = reference.arrow_weights_ref(t.x, t.protos, t.valid, route)
    assert w.shape == w_ref.shape and w.dtype == torch.float32
    assert torch.allclose(w, w_ref, atol=1e-6, rtol=1e-5)
    # per (token, slice): top_k weights summing to 1, or all 0 where no library expert is valid
    nonzero = (w > 0).sum(dim=1)
    k = route.top_k.view(-1, 1)
    n_valid = (route.allowed.unsqueeze(2) & t.valid[route.experts].unsqueeze(0)).sum(dim=1)
    assert torch.equal(nonzero, torch.minimum(k.expand_as(n_valid), n_valid))
    sums = w.sum(dim=1)
    assert torch.allclose(sums[n_valid > 0], torch.ones(()), atol=1e-6)
    assert torch.equal(sums[n_valid == 0], torch.zeros_like(sums[n_valid == 0]))


@pytest.mark.parametrize("temperature", [1e-38, 1e-30])
def test_a_tiny_temperature_keeps_the_top_expert_alone_not_nan(temperature):
    # scores ~10 over a float32 temperature this small overflow to inf when divided first
    x = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 1.0]])
    protos = torch.eye(4)[:3].view(3, 1, 4)  # slot u's prototype is the unit vector e_u
    n_t, n_u, k = 2, 3, 2
    route = RouteTable(tokens=torch.arange(n_t), experts=torch.arange(n_u),
                       allowed=torch.ones(n_t, n_u, dtype=torch.bool), top_k=torch.full((n_t, 1), k),
                       temperature=torch.full((n_t, 1), temperature), k_max=k,
                       rank_ok=torch.ones(n_t, k, 1, dtype=torch.bool))
    w = arrow_weights(x, protos, torch.ones(3, 1, dtype=torch.bool), route)
    assert torch.equal(w.view(n_t, n_u), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("mode", list(MODES))
def test_no_valid_expert_gives_zero_delta(mode):
    # the "qkv_mixed" route over slots 6 and 7: neither targets slice 1, so nothing is added there
    sc = SCENES["qkv_mixed"]
    t = make(sc, torch.float32, seed=3, mode=mode)
    at = sum(c[1] for c in sc.chunks[:7])
    y = t.y.clone()
    run_fast(t, y, sc.offsets, "torch")
    lo, hi = sc.offsets[1], sc.offsets[2]
    assert torch.equal(y[at:at + 2, lo:hi], t.y[at:at + 2, lo:hi])
    assert not torch.equal(y[at:at + 2, :lo], t.y[at:at + 2, :lo])


def test_rows_of_single_adapters_equal_add_lora():
    # the rows path with weight-1 rows only is today's add_lora over the same tokens, in any token order
    sc = SCENES["qkv_mixed"]
    t = make(sc, torch.float32, seed=4)
    plan = RowPlan()
    order = [5, 0, 9, 1, 2]  # token rows, slots below ascending after sorting
    slots = [1, 1, 2, 4, 7]
    for tok, s in zip(order, slots):
        plan.add(s, tok, 1)
    p = plan.build("cpu")
    lens, sl, rows = p.seg_lens, p.seg_slots, p.rows
    assert sl == [1, 2, 4, 7] and lens == [2, 1, 1, 1] and p.dense is None
    seg_rows = LoraSegments.build(lens, sl, [sc.ranks[s] for s in sl], sc.num_slots, "cpu")
    y = t.y.clone()
    add_lora_rows(y, t.x, t.a, t.b, seg_rows, sc.offsets, rows, backend="torch")
    xs, ys = t.x[order], t.y[order].clone()
    add_lora(ys, xs, t.a, t.b, seg_rows, sc.offsets, backend="torch")
    assert torch.allclose(y[order], ys, atol=1e-6, rtol=1e-5)
    rest = [i for i in range(sc.num_tokens) if i not in order]
    assert torch.equal(y[rest], t.y[rest])


def test_plan_tables():
    plan = RowPlan()
    plan.add(3, 0, 2, 0.5)
    plan.add_routed([5, 3, 3], 2, 2, top_k=4, temperature=0.5)  # repeats collapse; k clamps to 2
    plan.add(1, 4, 1)
    p = plan.build("cpu", dense_slack=0.0)  # routed pairs as rows
    lens, slots, rows = p.seg_lens, p.seg_slots, p.rows
    assert slots == [1, 3, 5] and lens == [1, 4, 2] and p.dense is None
    assert rows.token.tolist() == [4, 0, 1, 2, 3, 2, 3]
    assert rows.weight.view(-1).tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    r = rows.route
    assert r.tokens.tolist() == [2, 3] and r.experts.tolist() == [3, 5] and r.k_max == 2
    assert r.allowed.tolist() == [[True, True], [True, True]]
    assert r.top_k.view(-1).tolist() == [2, 2] and r.temperature.view(-1).tolist() == [0.5, 0.5]
    assert r.rows.tolist() == [3, 4, 5, 6] and r.pairs.tolist() == [0, 2, 1, 3]
    d = plan.build("cpu")  # one library: dense by default; the routed tokens are in no row
    assert d.seg_slots == [1, 3] and d.seg_lens == [1, 2] and d.rows.route is None
    assert d.rows.token.tolist() == [4, 0, 1] and d.dense.rows is None and d.dense.tokens.tolist() == [2, 3]


def test_plan_routing_mode_and_identity_rows():
    # singles first in slot order + routes over one library: no rows table at all (add_lora's path)
    plan = RowPlan()
    plan.add(2, 0, 3)
    plan.add(5, 3, 1)
    plan.add_routed([1, 2, 5], 4, 2, top_k=2, temperature=1.0)
    plan.add_routed([5, 2, 1], 6, 1, top_k=1, temperature=1.0)
    p = plan.build("cpu")
    assert p.rows is None and p.seg_slots == [2, 5] and p.seg_lens == [3, 1]
    assert p.dense.experts.tolist() == [1, 2, 5] and p.dense.tokens.tolist() == [4, 5, 6]
    assert p.dense.k_max == 2 and p.dense.top_k.view(-1).tolist() == [2, 2, 1]
    # disjoint libraries: 3 tokens x 6 experts > 1.5 x 9 pairs -> routed pairs as rows
    plan = RowPlan()
    plan.add_routed([1, 2, 3], 0, 2, top_k=2, temperature=1.0)
    plan.add_routed([4, 5, 6], 2, 1, top_k=2, temperature=1.0)
    p = plan.build("cpu")
    assert p.dense is None and p.rows.route is not None and p.rows.num_rows == 9
    assert p.rows.route.allowed.tolist() == [[True] * 3 + [False] * 3] * 2 + [[False] * 3 + [True] * 3]


# ---------------------------------------------------------------- torch (CPU fast path)

def _run(sc: Scene, dt: str, backend: str, seed: int, mode: str):
    t = make(sc, DTYPES.get(dt) or MIXED_DTYPES[dt], seed=seed, mode=mode)
    y_ref, y = t.y.clone(), t.y.clone()
    run_ref(t, y_ref, sc.offsets)
    run_fast(t, y, sc.offsets, backend)
    check(y, y_ref, t.y, sc, loose=dt != "fp32")


MIXED_DTYPES = {"x_bf16_w_fp32": (torch.bfloat16, torch.float32), "x_fp32_w_bf16": (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("dt", list(DTYPES) + list(MIXED_DTYPES))
def test_torch_rows_match_reference(name, dt, mode):
    _run(SCENES[name], dt, "torch", seed=5, mode=mode)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCENES))
def test_torch_path_matches_dense_and_peft_directly(name, mode):
    # not only through the oracle: the fast path itself against float64 sums and PEFT's Arrow forward
    sc = SCENES[name]
    t = make(sc, torch.float32, seed=10, mode=mode)
    y = t.y.clone()
    run_fast(t, y, sc.offsets, "torch")
    check(y, dense_expected(sc, t), t.y, sc, loose=False)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_dora_rescale(with_bias, dt):
    # DoRA tokens (slots 1 and 4) against PEFT's formula y = b + g * (x W^T + B A x) with the base
    # weight; the other tokens (plain LoRA slot 2, base-only) untouched by the rescale
    sc = SCENES["qkv_mixed"]
    dtype = DTYPES[dt]
    t = make(sc, dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    out_total = sum(sc.widths)
    w_base = (torch.randn(out_total, sc.in_dim, generator=g) / sc.in_dim ** 0.5).to(dtype)
    bias = torch.randn(out_total, generator=g).to(dtype) if with_bias else None
    scale = torch.ones(sc.num_slots, out_total)
    scale[1] = 0.5 + torch.rand(out_total, generator=g)
    scale[4] = 0.5 + torch.rand(out_total, generator=g)
    lens, slots, tok_slots = [2, 3, 1], [1, 2, 4], [1, 1, 2, 2, 2, 4]  # 6 LoRA tokens, then 2 base-only
    seg = LoraSegments.build(lens, slots, [sc.ranks[s] for s in slots], sc.num_slots, "cpu")
    x = t.x[:8]
    y = torch.nn.functional.linear(x, w_base, bias)
    add_lora(y, x, t.a, t.b, seg, sc.offsets, backend="torch")
    y0 = y.clone()
    tokens, dslots = torch.tensor([0, 1, 5]), torch.tensor([1, 1, 4])
    y_ref = y0.clone()
    reference.dora_rescale_ref(y_ref, bias, scale, tokens, dslots)
    dora_rescale(y, bias, scale, tokens, dslots)
    assert torch.allclose(y.float(), y_ref.float(), atol=1e-6 if dt == "fp32" else 2e-2, rtol=1e-5)
    assert torch.equal(y[2:5], y0[2:5]) and torch.equal(y[6:], y0[6:])
    # independent: float64 PEFT formula per DoRA token
    xd, R = x.double(), sc.r_pad
    for tok in (0, 1, 5):
        s = tok_slots[tok]
        lora = torch.cat([xd[tok] @ t.a[s, j * R:(j + 1) * R].double().T
                          @ t.b[s, sc.offsets[j]:sc.offsets[j + 1]].double().T for j in range(3)])
        bb = bias.double() if bias is not None else 0.0
        want = bb + scale[s].double() * (xd[tok] @ w_base.double().T + lora)
        err = (y[tok].double() - want).norm() / want.norm()
        assert err < (1e-5 if dt == "fp32" else 2e-2)


# ---------------------------------------------------------------- Triton, interpreter on CPU

needs_interp = pytest.mark.skipif(not INTERP, reason="Triton interpreter not active in-process")


@needs_interp
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_triton_interp_rows_match_reference(name, dt):
    _run(SCENES[name], dt, "triton", seed=8, mode="rows")


@pytest.mark.skipif(INTERP or CUDA or not HAVE_TRITON or CHILD,
                    reason="interpreter tests already ran in-process (or no triton)")
def test_triton_interp_in_subprocess():
    rerun_in_child(__file__)


# ---------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCENES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_cuda_matches_reference_without_host_sync(name, dt, mode):
    sc = SCENES[name]
    ref, t = make(sc, DTYPES[dt], seed=9, mode=mode), make(sc, DTYPES[dt], seed=9, mode=mode, device="cuda")
    y_ref, y = ref.y.clone(), t.y.clone()
    run_ref(ref, y_ref, sc.offsets)
    scale = torch.rand(sc.num_slots, y.shape[1], device="cuda") + 0.5
    tokens, slots = torch.tensor([0, 3], device="cuda"), torch.tensor([2, 4], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the ops raises
    try:
        run_fast(t, y, sc.offsets, "triton")
        dora_rescale(y, None, scale, tokens, slots)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    reference.dora_rescale_ref(y_ref, None, scale.cpu(), tokens.cpu(), slots.cpu())
    check(y.cpu(), y_ref, ref.y, sc, loose=dt == "bf16")


def test_plan_tables_of_mixtures():
    plan = RowPlan()
    plan.add(2, 0, 1)
    plan.add_mixture([4, 1], [0.75, -0.5], 1, 2)  # tokens 1, 2
    plan.add_mixture([1], [2.0], 3, 1)  # token 3: shares expert 1
    d = plan.build("cpu")  # 3 tokens x 2 experts <= 1.5 x 5 pairs: dense
    assert d.seg_slots == [2] and d.rows is None and d.dense is None
    m = d.mixed
    assert m.tokens.tolist() == [1, 2, 3] and m.experts.tolist() == [1, 4]
    assert m.weight.view(3, 2).tolist() == [[-0.5, 0.75], [-0.5, 0.75], [2.0, 0.0]]
    r = plan.build("cpu", dense_slack=0.0)  # as rows: one per (token, expert)
    assert r.mixed is None and r.seg_slots == [1, 2, 4] and r.seg_lens == [3, 1, 2]
    assert r.rows.token.tolist() == [1, 2, 3, 0, 1, 2]
    assert r.rows.weight.view(-1).tolist() == [-0.5, -0.5, 2.0, 1.0, 0.75, 0.75]


def test_plan_leaves_out_experts_of_weight_zero():
    """An expert of weight exactly 0 (either sign) adds nothing: no row, no dense column, and no part
    in the dense-or-rows choice; a mixture of zeros alone adds no LoRA work (the engine side:
    test_experts_engine.py)."""
    plan = RowPlan()
    plan.add_mixture([4, 1], [0.0, 0.5], 0, 2)  # tokens 0, 1: expert 4 at weight 0
    plan.add_mixture([3, 1], [-0.0, 2.0], 2, 1)  # token 2
    plan.add_mixture([3, 4], [0.0, 0.0], 3, 1)  # token 3: all zero
    d = plan.build("cpu")
    assert d.mixed.tokens.tolist() == [0, 1, 2] and d.mixed.experts.tolist() == [1]
    assert d.mixed.weight.view(-1).tolist() == [0.5, 0.5, 2.0]
    r = plan.build("cpu", dense_slack=0.0)
    assert r.mixed is None and r.seg_slots == [1] and r.rows.token.tolist() == [0, 1, 2]
    zeros = RowPlan()
    zeros.add_mixture([2, 5], [0.0, 0.0], 0, 3)
    z = zeros.build("cpu")
    assert z.seg_slots == [] and z.mixed is None and z.dense is None
