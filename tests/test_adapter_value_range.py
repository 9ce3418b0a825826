"""Finite is not enough: the values an adapter puts in the device pool (A, and B times its scale)
must stay far inside the float range, or the pool holds infinities. The dense mixture path runs
every mixture token of a step against every mixture expert of that step, with weight 0 for the
experts a token does not use, and 0 * inf is NaN: one tenant's adapter with a huge (finite)
lora_alpha turned another tenant's mixture into NaN (greedy token 0 every step). Such adapters
are refused, naming the module and where its scale comes from; references are PEFT-made adapters
and the engine's own output for the same request without the bad adapter in the batch."""

from __future__ import annotations

import json
import time

import pytest

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, Mixture, SamplingParams

from adapter_files import CONFIG, edit_config, edit_weights, load, refused
from peft_adapters import make_peft_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_a_scale_past_the_float_range_is_refused(adapter):
    edit_config(adapter, lora_alpha=1e300)  # finite JSON, finite float64; inf once a float32 scale
    refused(adapter, "adapter_invalid", "lora_B * scale", "lora_alpha")


def test_an_alpha_pattern_scale_is_named(adapter):
    cfg = json.loads((adapter / CONFIG).read_text())
    module = cfg["target_modules"][0]
    edit_config(adapter, alpha_pattern={module: 1e12})
    refused(adapter, "adapter_invalid", "lora_B * scale", "alpha_pattern")


def test_huge_finite_lora_a_is_refused(adapter):
    def blow_up(tensors):
        name = next(n for n in sorted(tensors) if "lora_A" in n)
        tensors[name] = tensors[name] * 1e36  # finite in float32: passes the NaN/Inf check
        return tensors

    edit_weights(adapter, blow_up)
    refused(adapter, "adapter_invalid", "lora_A")


def test_large_but_plausible_values_are_served(adapter):
    edit_config(adapter, lora_alpha=512.0)  # a scale of 64-128 over ~0.5 weights: far below the bound
    edit_weights(adapter, lambda t: {n: v * 4 for n, v in t.items()})
    ours = load(adapter)
    assert max(w.b.abs().max().item() * w.scale for w in ours.modules.values()) > 100


def _run(engine: LLMEngine, jobs: dict[str, Mixture], new: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for rid, mix in jobs.items():
        engine.add_request(GenerationRequest(rid, [5, 17, 42, 99], params, experts=mix))
    tokens: dict[str, list[int]] = {rid: [] for rid in jobs}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        if engine.idle:
            time.sleep(0.01)
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error_code
            tokens[out.request_id].extend(out.token_ids)
    return tokens, errors


def test_a_tenants_extreme_adapter_cannot_poison_anothers_mixture(tiny_llama_dir, tmp_path):
    """Store adapters are read at their first use: the extreme one fails its own request (400
    adapter_invalid) and the other request, run in the same steps, is exactly what it is alone."""
    store = tmp_path / "store"
    for name, seed in (("g1", 1), ("g2", 2), ("bad", 3)):
        make_peft_adapter(tiny_llama_dir, store / name, seed=seed, **QV)
    edit_config(store / "bad", lora_alpha=1e300)

    def engine() -> LLMEngine:
        cfg = Config()
        cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
        cfg.lora.adapters_dir, cfg.lora.lora_backend = str(store), "torch"
        return LLMEngine(cfg, tiny_llama_dir)

    mine = Mixture(("g1", "g2"), (0.5, 0.5))
    alone, _ = _run(engine(), {"mine": mine}, 6)
    together, errors = _run(engine(), {"mine": mine, "theirs": Mixture(("bad", "g1"), (0.5, 0.5))}, 6)
    assert together["mine"] == alone["mine"]
    assert errors == {"theirs": "adapter_invalid"}
