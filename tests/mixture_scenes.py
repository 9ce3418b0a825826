"""Scenes for the LoRA-over-rows kernels (mixtures, Arrow routing, DoRA): a slot pool and a step's
chunks, the step's tables built from them (`make`), the fast path and the per-token oracles run
over them (`run_fast`, `run_ref`), and an independent float64 expectation from the scene's own
description, using PEFT's Arrow forward for routed chunks (`dense_expected`). Shared by
tests/test_kernels_mixture.py and tests/test_lora_rows_step.py."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from types import SimpleNamespace

import torch
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from peft.tuners.lora.config import ArrowConfig

from kernels import LoraSegments, RowPlan, add_lora, add_lora_mixed, add_lora_routed, add_lora_rows, reference

@dataclass
class Scene:
    """A pool (slot -> rank of its adapter; others hold garbage), the fused slices of one
    projection, and the step's chunks in flat-batch order:
      ("single", n, slot) | ("mix", n, [(slot, weight), ...]) | ("route", n, [slots], top_k, temp)
      | ("base", n)
    invalid: (slot, slice) pairs whose adapter does not target that slice."""

    ranks: dict
    num_slots: int
    r_pad: int
    in_dim: int
    widths: list
    chunks: list
    invalid: tuple = ()

    @property
    def offsets(self):
        return tuple(accumulate(self.widths, initial=0))

    @property
    def num_tokens(self):
        return sum(c[1] for c in self.chunks)


SCENES = {
    # fused qkv, odd sizes, mixed ranks; routes with a library where slots 6 and 7 both miss
    # slice 1 (no expert there: delta 0), a route whose top_k exceeds its library, negative weights
    "qkv_mixed": Scene(
        {1: 8, 2: 3, 4: 5, 6: 1, 7: 8}, 8, 8, 37, [13, 7, 7],
        [("single", 3, 2), ("mix", 2, [(1, 0.7), (4, 0.3)]), ("route", 4, [1, 2, 4, 6, 7], 3, 1.0),
         ("base", 2), ("single", 1, 4), ("route", 1, [2, 6], 3, 0.5),
         ("mix", 1, [(6, -0.5), (7, 1.5), (2, 1.0)]), ("route", 2, [6, 7], 1, 2.0), ("single", 2, 2)],
        invalid=((6, 1), (7, 1), (4, 2))),
    # gate_up-like decode: one token per chunk, two slices, several routes with different k/temp
    "gateup_decode": Scene(
        {0: 4, 3: 8, 5: 2, 9: 6, 10: 8}, 12, 8, 40, [24, 24],
        [("route", 1, [0, 3, 5, 9, 10], 3, 1.0), ("single", 1, 3), ("mix", 1, [(0, 0.5), (10, 0.5)]),
         ("route", 1, [0, 3, 5, 9, 10], 2, 0.3), ("base", 1), ("mix", 1, [(0, 0.25), (3, 0.25), (5, 0.25), (9, 0.25)]),
         ("route", 1, [3, 9], 1, 1.0), ("single", 1, 10)],
        invalid=((5, 0),)),
    # one slice (down-like), a long routed prefill chunk next to a mixture prefill
    "down_prefill": Scene(
        {1: 16, 2: 7, 3: 12}, 4, 16, 48, [33],
        [("mix", 9, [(1, 1.0), (3, -0.25)]), ("route", 17, [1, 2, 3], 2, 1.0), ("base", 3), ("single", 5, 2)]),
}


MODES = {"dense": float("inf"), "rows": 0.0}  # RowPlan.build's dense_slack forcing each routing mode


def make(scene: Scene, dtype, seed=0, mode="dense", device="cpu"):
    """Random pool honouring the pool contract (zero past each adapter's rank; inactive slots
    hold large garbage), unit prototypes, the rows plan and its segment table."""
    g = torch.Generator().manual_seed(seed)
    n_s, R, N = len(scene.widths), scene.r_pad, scene.num_slots
    out_total = sum(scene.widths)
    a = torch.randn(N, n_s * R, scene.in_dim, generator=g) * 5
    b = torch.randn(N, out_total, R, generator=g) * 5
    for s, r in scene.ranks.items():
        a[s] = torch.randn(n_s * R, scene.in_dim, generator=g) / scene.in_dim ** 0.5
        b[s] = torch.randn(out_total, R, generator=g) / r ** 0.5
        for j in range(n_s):
            a[s, j * R + r:(j + 1) * R] = 0
        b[s, :, r:] = 0
    for s, j in scene.invalid:  # the adapter does not target slice j: zero weights there
        a[s, j * R:(j + 1) * R] = 0
        b[s, scene.offsets[j]:scene.offsets[j + 1]] = 0
    protos = torch.nn.functional.normalize(torch.randn(N, n_s, scene.in_dim, generator=g), dim=-1)
    valid = torch.ones(N, n_s, dtype=torch.bool)
    for s, j in scene.invalid:
        valid[s, j] = False
        protos[s, j] = 0
    T = scene.num_tokens
    x = torch.randn(T, scene.in_dim, generator=g)
    y = torch.randn(T, out_total, generator=g)
    plan, at = RowPlan(), 0
    for kind, n, *spec in scene.chunks:
        if kind == "single":
            plan.add(spec[0], at, n)
        elif kind == "mix":
            plan.add_mixture([s for s, _ in spec[0]], [w for _, w in spec[0]], at, n)
        elif kind == "route":
            plan.add_routed(spec[0], at, n, spec[1], spec[2])
        at += n
    p = plan.build(device, dense_slack=MODES[mode])
    seg = LoraSegments.build(p.seg_lens, p.seg_slots, [scene.ranks[s] for s in p.seg_slots], N, device)
    xdt, wdt = dtype if isinstance(dtype, tuple) else (dtype, dtype)  # activations, LoRA weights
    cx = lambda t: t.to(device=device, dtype=xdt)  # noqa: E731
    cw = lambda t: t.to(device=device, dtype=wdt)  # noqa: E731
    return SimpleNamespace(seg=seg, rows=p.rows, dense=p.dense, mixed=p.mixed, x=cx(x), a=cw(a), b=cw(b), y=cx(y),
                           protos=cw(protos), valid=valid.to(device))


def run_fast(t, y, offsets, backend):
    """The step's LoRA as LoraStep runs it: rows (or tokens), then dense mixtures and routed tokens."""
    if t.rows is None:
        add_lora(y, t.x, t.a, t.b, t.seg, offsets, backend=backend)
    else:
        add_lora_rows(y, t.x, t.a, t.b, t.seg, offsets, t.rows, t.protos, t.valid, backend=backend)
    if t.mixed is not None:
        add_lora_mixed(y, t.x, t.a, t.b, offsets, t.mixed)
    if t.dense is not None:
        add_lora_routed(y, t.x, t.a, t.b, offsets, t.dense, t.protos, t.valid)


def run_ref(t, y, offsets):
    if t.rows is None:
        reference.add_lora_ref(y, t.x, t.a, t.b, t.seg, offsets)
    else:
        reference.add_lora_rows_ref(y, t.x, t.a, t.b, t.seg, offsets, t.rows, t.protos, t.valid)
    if t.mixed is not None:
        reference.add_lora_mixed_ref(y, t.x, t.a, t.b, offsets, t.mixed)
    if t.dense is not None:
        reference.add_lora_routed_ref(y, t.x, t.a, t.b, offsets, t.dense, t.protos, t.valid)


def peft_arrow_delta(x, a_list, b_list, protos, top_k, temperature):
    """PEFT's own Arrow forward (ArrowLoraLinearLayer.forward) on float64 copies: x [n, in],
    a_list[e] [R, in], b_list[e] [out, R] (already scaled), protos [E, in] -> delta [n, out]."""
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature)
    names = [f"task_{i}" for i in range(len(a_list))]
    cfg.task_adapter_names, cfg.gks_adapter_names = names, []
    layer = ArrowLoraLinearLayer(x.shape[1], cfg)
    layer.register_buffer("prototypes", protos.double(), persistent=False)
    layer._protos_ready = True
    lora_a = {n: SimpleNamespace(weight=w.double()) for n, w in zip(names, a_list)}
    lora_b = {n: SimpleNamespace(weight=w.double()) for n, w in zip(names, b_list)}
    out = layer.forward(x.double().unsqueeze(0), lora_a, lora_b, torch.nn.Identity(), {n: 1.0 for n in names})
    return out.squeeze(0)


def dense_expected(scene: Scene, t):
    """Float64 y + delta from the scene's own description: sum_i w_i B_i A_i x per slice for
    singles and mixtures, PEFT's Arrow forward per slice for routed chunks."""
    R, offs = scene.r_pad, scene.offsets
    a, b, x = t.a.double(), t.b.double(), t.x.double()
    y = t.y.double().clone()
    at = 0
    for kind, n, *spec in scene.chunks:
        xs = x[at:at + n]
        for j in range(len(scene.widths)):
            lo, hi = offs[j], offs[j + 1]
            a_j = lambda s: a[s, j * R:(j + 1) * R]  # noqa: E731
            if kind in ("single", "mix"):
                for slot, w in ([(spec[0], 1.0)] if kind == "single" else spec[0]):
                    y[at:at + n, lo:hi] += w * xs @ a_j(slot).T @ b[slot, lo:hi].T
            elif kind == "route":
                lib = [s for s in sorted(set(spec[0])) if (s, j) not in scene.invalid]
                if lib:
                    y[at:at + n, lo:hi] += peft_arrow_delta(
                        xs, [a_j(s) for s in lib], [b[s, lo:hi] for s in lib],
                        t.protos[lib, j], min(spec[1], len(lib)), spec[2])
        at += n
    return y


def base_rows(scene: Scene):
    at, rows = 0, []
    for kind, n, *_ in scene.chunks:
        if kind == "base":
            rows.extend(range(at, at + n))
        at += n
    return rows


def check(out, ref, y0, scene: Scene, loose: bool):
    assert torch.isfinite(out).all()
    base = base_rows(scene)
    assert torch.equal(out[base], y0[base]), "base-only rows were modified"
    lora = [i for i in range(scene.num_tokens) if i not in base]
    delta = (ref[lora].double() - y0[lora].double()).norm()
    assert delta > 0.1 * y0[lora].double().norm(), "test is vacuous: tiny delta"
    err = (out[lora].double() - ref[lora].double()).norm() / ref[lora].double().norm()
    tol = 1.5e-2 if loose else 1e-5
    assert err < tol, f"relative error {err:.3g} >= {tol}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
