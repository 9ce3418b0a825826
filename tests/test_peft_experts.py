"""The issue-12 oracles themselves (tests/peft_experts.py): the adapters have the promised spectral
gap, and PEFT's mixture, Arrow and DoRA references reduce to what they must in the cases where the
answer is known independently (one adapter, a zero weight, disjoint targets, a unit DoRA rescale)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peft_experts import (Arrow, ArrowRef, Mix, arrow_model, lora_twin, make_expert, module_factors,
                          reference_greedy, singular_values, top_right_singular_vector)

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
