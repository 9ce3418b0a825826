"""The engine's side of mixture and routed requests (issue 12), in-process on the tiny random
Llama: every expert acquired at admission (the version held) and released however the request
ends, limits refused before anything is held, a waiting mixture failed once a load shows a DoRA
expert, and mixtures running beside single-adapter and base requests."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, InvalidRequestError, Mixture, Route, SamplingParams

from peft_adapters import make_peft_adapter

QV = dict(target_modules=["q_proj", "v_proj"])
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory) -> Path:
    made = tmp_path_factory.mktemp("made")
    store = tmp_path_factory.mktemp("store")
    for i, name in enumerate("abc"):
        shutil.copytree(make_peft_adapter(tiny_llama_dir, made / name, seed=60 + i, r=4, lora_alpha=8, **QV),
                        store / name)
    shutil.copytree(make_peft_adapter(tiny_llama_dir, made / "dora", seed=64, r=4, lora_alpha=8, use_dora=True,
                                      **QV), store / "dora")
    return store


def engine(tiny_llama_dir, store, **lora) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.lora.adapters_dir = str(store)
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return LLMEngine(cfg, tiny_llama_dir)


def run(eng: LLMEngine) -> dict[str, object]:
    """Step until idle (adapter loads run on a thread: bounded in time, not steps); each
    request's final output."""
    final = {}
    deadline = time.monotonic() + 60
    while eng.has_unfinished() and time.monotonic() < deadline:
        if eng.idle:
            time.sleep(0.01)
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    assert not eng.has_unfinished()
    return final


def lora_info(eng: LLMEngine) -> dict[str, str]:
    """The labels of the one vllm:lora_requests_info series."""
    (sample,) = [s for m in eng.metrics.vllm.lora_requests_info.collect() for s in m.samples]
    return sample.labels


def users(eng: LLMEngine, *names: str) -> list[int]:
    return [eng.adapters.num_users(eng.adapters.lookup(None, n)) for n in names]


def test_experts_are_held_while_the_request_lives_and_released_however_it_ends(tiny_llama_dir, store):
    eng = engine(tiny_llama_dir, store)
    eng.add_request(GenerationRequest("mix", [5, 6, 7], PARAMS, experts=Mixture(("a", "b"), (0.5, 0.5))))
    eng.add_request(GenerationRequest("route", [5, 6, 7], PARAMS, experts=Route(("b", "c"), 1, 1.0)))
    eng.add_request(GenerationRequest("gone", [5, 6, 7], PARAMS, experts=Route(("a", "c"), 2, 1.0)))
    eng.add_request(GenerationRequest("single", [5, 6, 7], PARAMS, adapter="a"))
    eng.add_request(GenerationRequest("base", [5, 6, 7], PARAMS))
    assert users(eng, "a", "b", "c") == [3, 2, 2]
    held = eng._seqs["mix"].adapters
    assert held == (eng.adapters.lookup(None, "a"), eng.adapters.lookup(None, "b"))  # versions, not names
    assert lora_info(eng)["waiting_lora_adapters"] == "a,b,c"  # experts are the adapters a pod will load
    eng.abort("gone")
    assert users(eng, "a", "b", "c") == [2, 2, 1]
    final = run(eng)
    assert {rid: (o.error, o.num_output_tokens) for rid, o in final.items()} == {
        rid: (None, 4) for rid in ("mix", "route", "single", "base")}
    assert users(eng, "a", "b", "c") == [0, 0, 0]


@pytest.mark.parametrize("experts,param,code", [
    (Mixture(("a", "nope"), (1.0, 1.0)), "adapters.1.id", "model_not_found"),  # the position, as the API
    (Route(("a", "nope"), 1, 1.0), "route.experts.1", "model_not_found"),
    (Mixture(("a", "b", "c"), (1.0, 1.0, 1.0)), "adapters", "too_many_experts"),  # step capacity 2
    (Mixture(("a", "a"), (1.0, 1.0)), "adapters", "duplicate_adapter"),
    (Mixture(("a", "b"), (1.0, float("nan"))), "adapters.1.weight", "invalid_value"),
    (Mixture(("a", "b"), (1e300, 1.0)), "adapters.0.weight", "invalid_value"),  # inf as float32
    (Route(("a", "b"), 1, 1e-300), "route.temperature", "invalid_value"),  # 0 as float32
    (Mixture(("a", "b"), (1.0,)), "adapters", "invalid_value"),
    (Route(("a", "b"), 3, 1.0), "route.top_k", "invalid_value"),
    (Route(("a", "b"), 0, 1.0), "route.top_k", "invalid_value"),
    (Route(("a", "b"), 1, 0.0), "route.temperature", "invalid_value"),
    (Route(("a", "b"), 1, float("inf")), "route.temperature", "invalid_value"),
    (Mixture((), ()), "adapters", "invalid_value"),
])
def test_refusals_hold_nothing(tiny_llama_dir, store, experts, param, code):
    eng = engine(tiny_llama_dir, store, max_loras=2)
    with pytest.raises(InvalidRequestError) as info:
        eng.add_request(GenerationRequest("r", [5, 6], PARAMS, experts=experts))
    assert (info.value.param, info.value.code) == (param, code)
    assert users(eng, "a", "b") == [0, 0] and not eng.has_unfinished()


def test_limits_from_the_config(tiny_llama_dir, store):
    eng = engine(tiny_llama_dir, store, max_mixture_experts=2, max_route_experts=2, max_mixture_rank=20)
    for experts, param in ((Mixture(("a", "b", "c"), (1.0,) * 3), "adapters"),
                           (Route(("a", "b", "c"), 1, 1.0), "route.experts"),
                           (Mixture(("a", "b"), (1.0, 1.0)), "adapters")):  # unread: 2 x 16 > 20
        with pytest.raises(InvalidRequestError) as info:
            eng.validate(GenerationRequest("r", [5], PARAMS, experts=experts))
        assert (info.value.param, info.value.code) == (param, "too_many_experts"), info.value
    with pytest.raises(InvalidRequestError):  # one adapter and experts: not both
        eng.validate(GenerationRequest("r", [5], PARAMS, adapter="a", experts=Route(("b",), 1, 1.0)))


def test_a_dora_expert_fails_the_waiting_mixture_alone(tiny_llama_dir, store):
    """The store lists `dora` unread: the mixture is queued, and fails (400 adapter_unsupported)
    when the load of its DoRA expert completes (or is refused, before DoRA parsing lands);
    the requests beside it run, and every expert is released."""
    eng = engine(tiny_llama_dir, store)
    eng.add_request(GenerationRequest("mix", [5, 6, 7], PARAMS, experts=Mixture(("a", "dora"), (1.0, 1.0))))
    eng.add_request(GenerationRequest("single", [5, 6, 7], PARAMS, adapter="a"))
    eng.add_request(GenerationRequest("route", [5, 6, 7], PARAMS, experts=Route(("b", "c"), 2, 1.0)))
    final = run(eng)
    assert final["mix"].error_code == "adapter_unsupported" and final["mix"].num_output_tokens == 0
    assert final["single"].error is None and final["route"].error is None
    assert users(eng, "a", "dora") == [0, 0]


def test_a_load_that_shows_dora_fails_the_waiting_mixture_not_the_single(tiny_llama_dir, store):
    """`dora` is listed unread, so nothing refuses the mixture up front; once its load shows it
    is DoRA the waiting mixture fails, while a single-adapter request for it runs (DoRA runs alone)."""
    eng = engine(tiny_llama_dir, store)
    eng.add_request(GenerationRequest("mix", [5, 6, 7], PARAMS, experts=Mixture(("a", "dora"), (1.0, 1.0))))
    eng.add_request(GenerationRequest("single", [5, 6, 7], PARAMS, adapter="dora"))
    final = run(eng)
    assert final["mix"].error_code == "adapter_unsupported"
    assert final["single"].error is None and final["single"].num_output_tokens == 4
    assert users(eng, "a", "dora") == [0, 0]


def test_experts_of_weight_zero_add_nothing(tiny_llama_dir, store):
    """A mixture's experts of weight 0 are left out of the step's LoRA work (kernels/row_plan.py):
    a mixture of zeros gives the base model's tokens, alone in its step or beside others, and one
    with a single nonzero weight of 1 gives that adapter's (transformers / PEFT greedy)."""
    from experts_runs import run_batch, warm
    from peft_adapters import peft_greedy

    prompt = [5, 6, 7, 8]
    base = peft_greedy(tiny_llama_dir, None, prompt, 4)[0]
    only_a = peft_greedy(tiny_llama_dir, store / "a", prompt, 4)[0]
    eng = engine(tiny_llama_dir, store)
    warm(eng, ["a", "b"])
    zeros, a_only = Mixture(("a", "b"), (0.0, -0.0)), Mixture(("b", "a"), (0.0, 1.0))
    assert run_batch(eng, [(zeros, prompt)], 4)[0] == [base]
    assert run_batch(eng, [(zeros, prompt), (a_only, prompt), (None, prompt)], 4)[0] == [base, only_a, base]
