"""The issue-12 oracles themselves (tests/peft_experts.py): the adapters have the promised spectral
gap, and PEFT's mixture, Arrow and DoRA references reduce to what they must in the cases where the
answer is known independently (one adapter, a zero weight, disjoint targets, a unit DoRA rescale)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_experts import (Arrow, ArrowRef, Mix, _gapped, arrow_model, lora_twin, make_expert, mixture_model,
                          module_factors, reference_greedy, reference_model, singular_values,
                          top_right_singular_vector)

NEW = 8
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [200, 17, 3, 99, 41, 250, 8, 8, 31, 77, 2]]
ABS = 2e-4  # logprob tolerance of the tiny-model parity tests (tests/test_lora_engine.py)

SPECS = {  # name -> make_expert kwargs: ranks and target sets differ
    "r8-all": dict(r=8, lora_alpha=16),
    "r8-all-b": dict(r=8, lora_alpha=8),
    "r8-all-c": dict(r=8, lora_alpha=32),
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], std=0.15),  # attention only: stronger
    "r16-mlp": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=8, use_rslora=True),
    "r64-kv": dict(r=64, lora_alpha=64, target_modules=["k_proj", "v_proj"]),  # rank above k/v's 32 outputs
}


@pytest.fixture(scope="module")
def experts(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {n: make_expert(tiny_llama_dir, root / n, seed=i, **kw) for i, (n, kw) in enumerate(SPECS.items())}


_memo: dict = {}


def ref(base: Path, job):
    """reference_greedy on PROMPTS, memoized: single-adapter references recur across tests."""
    if (base, job) not in _memo:
        _memo[(base, job)] = reference_greedy(base, job, PROMPTS, NEW)
    return _memo[(base, job)]


def same(got, want) -> None:
    for (gt, gl), (wt, wl) in zip(got, want, strict=True):
        assert gt == wt
        assert gl == pytest.approx(wl, abs=ABS)


def differs(got, want) -> bool:
    """Other tokens, or logprobs far outside the parity tolerance."""
    return any(g[0] != w[0] or max(abs(a - b) for a, b in zip(g[1], w[1])) > 10 * ABS
               for g, w in zip(got, want, strict=True))


def test_every_module_has_the_spectral_gap(experts, tiny_llama_dir, tmp_path):
    for name, path in experts.items():
        factors = module_factors(path)
        assert factors, name
        for module, (a, b) in factors.items():
            s = singular_values(a, b)
            assert s[0] / s[1] == pytest.approx(4.0, rel=1e-3), (name, module)
            assert b.abs().min() > 0  # B is dense random, not PEFT's zero init
    again = make_expert(tiny_llama_dir, tmp_path / "again", seed=0, **SPECS["r8-all"])
    other = make_expert(tiny_llama_dir, tmp_path / "other", seed=1, **SPECS["r8-all"])
    first, second, third = module_factors(experts["r8-all"]), module_factors(again), module_factors(other)
    assert all(torch.equal(first[k][i], second[k][i]) for k in first for i in (0, 1))  # seeded
    assert not torch.equal(first[next(iter(first))][0], third[next(iter(first))][0])


def test_power_iteration_prototypes_equal_the_exact_ones(experts, tiny_llama_dir):
    """PEFT's 15-step power iteration lands on the top right singular vector (to fp32 precision)
    on these adapters, so exact prototypes (ours) and PEFT's route identically."""
    paths = [experts[n] for n in ("r8-all", "r8-all-b", "r8-all-c")]
    model = arrow_model(tiny_llama_dir, paths, top_k=2)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))  # prototypes are built on the first forward
    factors = [module_factors(p) for p in paths]
    checked = 0
    for name, m in model.named_modules():
        if not hasattr(m, "lora_arrow"):
            continue
        key = name.replace("base_model.model.", "base_model.model.", 1)
        protos = m.lora_arrow["arrow_router"].prototypes
        for e, f in enumerate(factors):
            exact = top_right_singular_vector(*f[key])
            assert abs(float(protos[e] @ exact)) == pytest.approx(1.0, abs=1e-6), (key, e)
            checked += 1
    assert checked == 3 * 3 * 7


@pytest.mark.parametrize("r,out,inp", [(8, 32, 64), (16, 1536, 576), (64, 192, 576)])  # tiny, SmolLM2 MLP/k
def test_power_iteration_converges_at_real_shapes(r, out, inp):
    """PEFT's own power iteration (15 steps, fp32) on gapped factors of SmolLM2's shapes."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    gen = torch.Generator().manual_seed(r)
    a, b = _gapped(torch.randn(r, inp, generator=gen) * 0.02, torch.randn(out, r, generator=gen) * 0.02, 4.0, gen)
    layer = ArrowLoraLinearLayer(inp, type("Cfg", (), dict(top_k=1, router_temperature=1.0, rng_seed=0,
                                                           task_adapter_names=[], gks_adapter_names=[],
                                                           use_gks=False))())
    proto = layer.top_right_singular_vec_from_BA(a, b)
    # PEFT divides by |w| + 1e-8 (|w| ~ sigma_1^2): its prototype is short by ~1e-8 / sigma_1^2
    assert float(proto.norm()) == pytest.approx(1.0, abs=1e-8 / float(singular_values(a, b)[0]) ** 2 + 1e-6)
    assert abs(float(proto @ top_right_singular_vector(a, b) / proto.norm())) == pytest.approx(1.0, abs=1e-6)


def _module(model, suffix: str):
    return next(m for n, m in model.named_modules() if n.endswith(suffix))


def test_mixture_module_is_the_weighted_sum_of_deltas(experts, tiny_llama_dir):
    """The design's mixture semantics at one module, against PEFT's cat mixture: ranks, scalings
    and target sets differ (r4-qv does not target o_proj: it adds nothing there)."""
    names, weights = ("r8-all-c", "r4-qv", "r8-rslora"), (0.7, -0.4, 1.3)
    model = mixture_model(tiny_llama_dir, [experts[n] for n in names], weights)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for suffix in ("layers.1.self_attn.q_proj", "layers.1.self_attn.o_proj"):
        m = _module(model, suffix)
        want = m.base_layer(x)
        for n, w in zip(names, weights):
            single = _module(reference_model(tiny_llama_dir, experts[n]), suffix)
            if hasattr(single, "lora_A") and "default" in single.lora_A:
                s = single.scaling["default"]
                want = want + w * s * (x @ single.lora_A["default"].weight.T @ single.lora_B["default"].weight.T)
        with torch.no_grad():
            assert torch.allclose(m(x), want, atol=1e-5), suffix


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dora_module_is_the_designs_rescale(family, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    """y = b + g * (x W^T + s B A x), g = m / ||W + s B A||_row, at a biased (qwen2 q_proj) and an
    unbiased module: what the server computes as y = g * y_lora + (1 - g) * b."""
    base = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    model = reference_model(base, make_expert(base, tmp_path / "d", seed=5, use_dora=True))
    gen = torch.Generator().manual_seed(1)
    for suffix in ("layers.0.self_attn.q_proj", "layers.2.mlp.down_proj"):
        m = _module(model, suffix)
        w, bias = m.base_layer.weight, m.base_layer.bias
        x = torch.randn(5, w.shape[1], generator=gen)
        s, a, b = m.scaling["default"], m.lora_A["default"].weight, m.lora_B["default"].weight
        g = m.lora_magnitude_vector["default"].weight / torch.linalg.norm(w + s * b @ a, dim=1)
        assert (g - 1).abs().max() > 0.05  # the rescale is not the identity
        y_lora = x @ w.T + (0 if bias is None else bias) + s * (x @ a.T @ b.T)
        want = g * y_lora + (1 - g) * (0 if bias is None else bias)
        assert (bias is not None) == (family == "qwen2" and "q_proj" in suffix)
        with torch.no_grad():
            assert torch.allclose(m(x), want, atol=1e-5), suffix


def test_mixture_of_one_adapter_is_that_adapter(experts, tiny_llama_dir):
    want = ref(tiny_llama_dir, experts["r8-all"])
    assert differs(want, ref(tiny_llama_dir, None))  # the adapter has teeth
    same(ref(tiny_llama_dir, Mix((experts["r8-all"],), (1.0,))), want)
    # cat path (two experts): the same adapter twice at half weight each, and a zero-weight partner
    same(ref(tiny_llama_dir, Mix((experts["r8-all"], experts["r8-all"]), (0.5, 0.5))), want)
    same(ref(tiny_llama_dir, Mix((experts["r8-all"], experts["r4-qv"]), (1.0, 0.0))), want)


def test_mixture_weights_are_honoured_whatever_the_first_adapters_config(experts, tiny_llama_dir):
    """PEFT copies the mix config from its first adapter: an rsLoRA one first would rescale the whole
    mixture; the oracle orders experts so that it does not."""
    rs = experts["r8-rslora"]
    want = ref(tiny_llama_dir, rs)
    same(ref(tiny_llama_dir, Mix((rs, experts["r16-mlp"]), (1.0, 0.0))), want)
    mixed = ref(tiny_llama_dir, Mix((rs, experts["r4-qv"]), (0.7, -0.4)))
    assert differs(mixed, want) and differs(mixed, ref(tiny_llama_dir, experts["r4-qv"]))


def test_arrow_over_one_expert_is_that_expert(experts, tiny_llama_dir):
    want = ref(tiny_llama_dir, experts["r8-all"])
    same(ref(tiny_llama_dir, Arrow((experts["r8-all"],), top_k=1)), want)
    same(ref(tiny_llama_dir, ArrowRef((experts["r8-all"],), top_k=1)), want)
    # two copies of one expert: equal logits, weights 1/2 each, the same delta
    twice = (experts["r8-all"], experts["r8-all"])
    same(ref(tiny_llama_dir, Arrow(twice, top_k=2)), want)


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (3, 0.5)])
def test_hand_arrow_equals_peft_arrow(experts, tiny_llama_dir, top_k, temperature):
    paths = tuple(experts[n] for n in ("r8-all", "r8-all-b", "r8-all-c"))
    want = ref(tiny_llama_dir, Arrow(paths, top_k, temperature))
    same(ref(tiny_llama_dir, ArrowRef(paths, top_k, temperature)), want)
    # routing is real: not any single expert
    for p in paths:
        assert differs(want, ref(tiny_llama_dir, p))


def test_hand_arrow_over_disjoint_targets_is_their_sum(experts, tiny_llama_dir):
    """Experts of different ranks and disjoint target sets: at each module only one expert takes
    part in routing, with weight 1, so Arrow equals their unit-weight mixture (PEFT's router
    refuses such a library; this is the design's extension)."""
    paths = (experts["r4-qv"], experts["r16-mlp"])
    want = ref(tiny_llama_dir, Mix(paths, (1.0, 1.0)))
    same(ref(tiny_llama_dir, ArrowRef(paths, top_k=2)), want)
    for p in paths:
        assert differs(want, ref(tiny_llama_dir, p))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v carry a bias
def test_dora_differs_from_its_lora_twin_unless_the_rescale_is_one(family, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    base = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    dora = make_expert(base, tmp_path / "dora", seed=3, use_dora=True)
    unit = make_expert(base, tmp_path / "unit", seed=3, use_dora=True, magnitude_jitter=0.0)
    assert differs(ref(base, dora), ref(base, lora_twin(dora, tmp_path / "dora-twin")))
    want = ref(base, lora_twin(unit, tmp_path / "unit-twin"))
    same(ref(base, unit), want)
    assert differs(want, ref(base, None))
