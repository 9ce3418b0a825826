"""The runner's per-step LoRA layout (ModelRunner._group_by_slot) and LoraStep.apply over a
hand-built pool: single-adapter, mixture, routed, DoRA and base-only chunks in one step give
each token its own delta (float64 dense sums, PEFT's Arrow forward, the DoRA formula), and a
step of single adapters only keeps the table over tokens with no rows and no DoRA work."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from mixture_scenes import SCENES, Scene, check, dense_expected, make

from server.adapters.manager import StepLora
from server.engine.backends.lora import TorchLora
from server.engine.model_runner import ModelRunner
from server.engine.request import Mixture, Route

REFS = {s: f"ad{s}" for s in range(16)}  # adapter ref of each pool slot (any hashable works)


def fake_chunk(kind, n, *spec):
    """A ScheduledChunk of a sequence whose request asks for (kind, spec) as in Scene.chunks."""
    adapter, experts = None, None
    if kind == "single":
        adapter = REFS[spec[0]]
    elif kind == "mix":
        experts = Mixture(tuple(REFS[s] for s, _ in spec[0]), tuple(w for _, w in spec[0]))
    elif kind == "route":
        experts = Route(tuple(REFS[s] for s in spec[0]), spec[1], spec[2])
    seq = SimpleNamespace(adapter=adapter, experts=experts)
    return SimpleNamespace(seq=seq, num_tokens=n, spec=(kind, n, *spec))


def step_for(scene: Scene, chunks, dora_slots=(), dtype=torch.float32, seed=0):
    """Run _group_by_slot on `chunks` over the scene's pool -> (ordered scene, tensors, LoraStep, dora scale)."""
    t0 = make(scene, dtype, seed=seed)  # the pool does not depend on the chunks' order
    out_total = sum(scene.widths)
    g = torch.Generator().manual_seed(seed + 100)
    dora = torch.ones(scene.num_slots, out_total)
    for s in dora_slots:
        dora[s] = 0.5 + torch.rand(out_total, generator=g)
    slots = SimpleNamespace(
        layer_a={"qkv": [t0.a]}, layer_b={"qkv": [t0.b]}, offsets={"qkv": scene.offsets},
        layer_proto={"qkv": [t0.protos]}, layer_proto_valid={"qkv": [t0.valid]}, layer_dora={"qkv": [dora]},
        slot_dora=[s in dora_slots for s in range(scene.num_slots)], groups={"qkv": ("q", "k", "v")},
        slot_groups=[frozenset({"qkv"}) if s in scene.ranks else frozenset() for s in range(scene.num_slots)],
        pages=None, ranks=None)  # an unpaged pool (paged ones: tests/test_kernels_pages.py)
    rank = [scene.ranks.get(s, 0) for s in range(scene.num_slots)]
    used = {s for s in scene.ranks}
    step_lora = StepLora({REFS[s]: s for s in used}, rank, scene.num_slots, slots)
    runner = SimpleNamespace(lora=TorchLora(torch.device("cpu")))
    ordered, step = ModelRunner._group_by_slot(runner, chunks, step_lora)
    laid_out = Scene(scene.ranks, scene.num_slots, scene.r_pad, scene.in_dim, scene.widths,
                     [c.spec for c in ordered], scene.invalid)
    return laid_out, make(laid_out, dtype, seed=seed), step, dora


def expected_with_dora(scene: Scene, t, dora, bias):
    want = dense_expected(scene, t)
    at = 0
    for kind, n, *spec in scene.chunks:
        if kind == "single":
            g = dora[spec[0]].double()
            want[at:at + n] = g * want[at:at + n] + (1 - g) * bias.double()
        at += n
    return want


def test_mixed_step_layout_and_deltas():
    sc = SCENES["qkv_mixed"]
    chunks = [fake_chunk(*c) for c in sc.chunks]
    random.Random(0).shuffle(chunks)
    laid_out, t, step, dora = step_for(sc, chunks, dora_slots=(4,))
    kinds = [c[0] for c in laid_out.chunks]
    singles = [c[2] for c in laid_out.chunks if c[0] == "single"]
    assert kinds[-1] == "base" and singles == sorted(singles)
    assert all(k in ("mix", "route") for k in kinds[len(singles):-1])
    assert step.rows is not None and step.rows.route is None  # mixtures as rows,
    assert step.routed is not None  # routes dense: their libraries overlap
    assert step.dora is not None and step.dora.slot.tolist() == [4]  # the one slot-4 token
    bias = torch.randn(t.y.shape[1], generator=torch.Generator().manual_seed(5))
    y = t.y.clone()
    step.apply(0, "qkv", t.x, y, bias)
    check(y, expected_with_dora(laid_out, t, dora, bias), t.y, laid_out, loose=False)


def test_single_adapter_steps_keep_the_table_over_tokens():
    sc = SCENES["gateup_decode"]
    chunks = [fake_chunk("single", 2, 10), fake_chunk("base", 1), fake_chunk("single", 1, 3),
              fake_chunk("single", 3, 10)]
    laid_out, t, step, dora = step_for(sc, chunks)
    assert [c[2] for c in laid_out.chunks[:3]] == [3, 10, 10] and laid_out.chunks[3][0] == "base"
    assert step.rows is None and step.dora is None  # today's path: no rows, no DoRA work
    assert step.segments.seg_slots == (3, 10) and step.segments.seg_starts == (0, 1, 6)
    y = t.y.clone()
    step.apply(0, "qkv", t.x, y, None)
    check(y, dense_expected(laid_out, t), t.y, laid_out, loose=False)


def test_dora_without_bias_in_a_single_adapter_step():
    sc = SCENES["down_prefill"]
    chunks = [fake_chunk("single", 4, 1), fake_chunk("single", 2, 2), fake_chunk("base", 2)]
    laid_out, t, step, dora = step_for(sc, chunks, dora_slots=(1,), dtype=torch.bfloat16)
    assert step.rows is None and step.dora.token.tolist() == [0, 1, 2, 3]
    y = t.y.clone()
    step.apply(0, "qkv", t.x, y, None)
    check(y, expected_with_dora(laid_out, t, dora, torch.zeros(t.y.shape[1])), t.y, laid_out, loose=True)


def test_single_adapters_with_routes_keep_tokens_and_route_dense():
    sc = SCENES["gateup_decode"]
    lib = [0, 3, 5, 9, 10]
    chunks = [fake_chunk("route", 2, lib, 3, 1.0), fake_chunk("single", 1, 10), fake_chunk("base", 1),
              fake_chunk("single", 2, 0), fake_chunk("route", 1, lib, 1, 0.5)]
    laid_out, t, step, _ = step_for(sc, chunks)
    assert step.rows is None and step.segments.seg_slots == (0, 10)  # singles over tokens, as before
    assert step.routed.tokens.tolist() == [3, 4, 5]
    y = t.y.clone()
    step.apply(0, "qkv", t.x, y, None)
    check(y, dense_expected(laid_out, t), t.y, laid_out, loose=False)


def test_disjoint_libraries_route_as_rows():
    sc = SCENES["gateup_decode"]
    chunks = [fake_chunk("route", 1, [0, 3], 1, 1.0), fake_chunk("route", 1, [5, 9], 2, 1.0),
              fake_chunk("route", 1, [10], 1, 1.0), fake_chunk("single", 1, 3)]
    laid_out, t, step, _ = step_for(sc, chunks, dtype=torch.bfloat16)
    assert step.routed is None and step.rows.route is not None and step.rows.num_rows == 6
    y = t.y.clone()
    step.apply(0, "qkv", t.x, y, None)
    check(y, dense_expected(laid_out, t), t.y, laid_out, loose=True)
