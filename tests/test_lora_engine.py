"""Heterogeneous multi-LoRA batches equal PEFT running each adapter alone.

Adapters are made here with PEFT itself (random A and B, so each visibly changes the
model); the reference is `PeftModel.generate` per prompt, greedy, fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters.slots import LoraSlots
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.arch import ModelArch

from engine_runs import greedy_with_logprobs
from peft_adapters import make_peft_adapter, peft_greedy

NEW = 24

# name -> LoraConfig kwargs: ranks 4..64, patterns, rsLoRA, regex targets, layer subsets.
ADAPTERS = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8-all": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]),
    "r16-rank-pattern": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             rank_pattern={"o_proj": 8, "self_attn.k_proj": 4}),
    "r32-alpha-pattern": dict(r=32, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"],
                              alpha_pattern={"down_proj": 96}),
    "r64-rslora": dict(r=64, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "r12-regex-layers": dict(r=12, lora_alpha=24, target_modules=r".*\.(k_proj|up_proj)$"),
    "r6-layers": dict(r=6, lora_alpha=6, target_modules=["o_proj", "down_proj"], layers_to_transform=[0, 2]),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(tiny_llama_dir, root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


def make_engine(model_dir: Path, adapter_dirs: dict[str, Path], max_loras: int | None = None,
                kv_cache_memory: int = 16 << 20, **lora) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.model.device = "cpu"
    cfg.cache.kv_cache_memory = kv_cache_memory
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapter_dirs.items()}
    cfg.lora.max_lora_rank = 64
    cfg.lora.max_loras = max_loras
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return LLMEngine(cfg, model_dir)


@pytest.fixture(scope="module")
def mixed_case(tiny_llama_dir, adapter_dirs):
    g = torch.Generator().manual_seed(7)
    names = [*ADAPTERS, None, None, "r8-all"]  # two base-only requests, one adapter used twice
    jobs = [(name, torch.randint(2, 320, (int(n),), generator=g).tolist())
            for name, n in zip(names, torch.randint(3, 40, (len(names),), generator=g))]
    expected = [peft_greedy(tiny_llama_dir, adapter_dirs[a] if a else None, p, NEW) for a, p in jobs]
    return jobs, expected


def test_mixed_adapter_batch_equals_peft_each_alone(tiny_llama_dir, adapter_dirs, mixed_case):
    jobs, expected = mixed_case
    engine = make_engine(tiny_llama_dir, adapter_dirs)
    tokens, logprobs = greedy_with_logprobs(engine, jobs, NEW)
    assert tokens == [e[0] for e in expected]
    for got, (_, want) in zip(logprobs, expected):
        assert got == pytest.approx(want, abs=2e-4)
    # The check has teeth: every adapter changes what the base model says on its prompt.
    for (adapter, prompt), (ref_tokens, _) in zip(jobs, expected):
        if adapter is not None:
            assert ref_tokens != peft_greedy(tiny_llama_dir, None, prompt, NEW)[0], adapter


def test_fewer_slots_than_adapters_is_scheduled_not_failed(tiny_llama_dir, adapter_dirs, mixed_case):
    jobs, expected = mixed_case
    two_slots = 2 * LoraSlots.slot_nbytes(ModelArch.from_dir(tiny_llama_dir), 64, torch.float32)
    engine = make_engine(tiny_llama_dir, adapter_dirs, lora_pool_memory=two_slots)
    assert engine.adapters.step_capacity == 2
    tokens, _ = greedy_with_logprobs(engine, jobs, NEW)
    assert tokens == [e[0] for e in expected]
    assert engine.metrics.adapter_evictions.labels("device")._value.get() > 0


def test_steps_skip_the_projections_their_adapters_leave_alone(tiny_llama_dir, adapter_dirs, mixed_case):
    """A step whose adapters adapt only some projection groups runs no LoRA kernel for the others
    (their slots hold zeros there), and each token still equals PEFT."""
    jobs, expected = mixed_case
    pick = [i for i, (name, _) in enumerate(jobs) if name in ("r4-qv", "r6-layers", None)]
    engine = make_engine(tiny_llama_dir, adapter_dirs)
    skipped: list[frozenset[str]] = []
    runner_lora = engine.runner.lora
    applier = runner_lora.applier

    def recording(*args, **kw):
        step = applier(*args, **kw)
        skipped.append(step.idle)
        return step

    runner_lora.applier = recording
    tokens, logprobs = greedy_with_logprobs(engine, [jobs[i] for i in pick], NEW)
    assert tokens == [expected[i][0] for i in pick]
    for got, i in zip(logprobs, pick):
        assert got == pytest.approx(expected[i][1], abs=2e-4)
    # q/v and o/down adapters: gate_up is always idle
    assert skipped and all("gate_up" in s for s in skipped)
    # o and down too while only the q/v one runs (alone here: in the mix above, whether some step
    # runs it without the o/down one depends on when each adapter's load completes)
    skipped.clear()
    qv = next(i for i in pick if jobs[i][0] == "r4-qv")
    assert greedy_with_logprobs(engine, [jobs[qv]], NEW)[0] == [expected[qv][0]]
    assert skipped and all(s == {"gate_up", "o", "down"} for s in skipped)


def test_bf16_adapter_weights_stay_close(tiny_llama_dir, adapter_dirs, mixed_case):
    """bf16 slots round A and B: the first token's logprob moves a little, never far."""
    jobs, expected = mixed_case
    engine = make_engine(tiny_llama_dir, adapter_dirs, lora_dtype="bfloat16")
    _, logprobs = greedy_with_logprobs(engine, jobs, 1)
    for got, (_, want) in zip(logprobs, expected):
        assert got[0] == pytest.approx(want[0], abs=0.05)


@pytest.fixture(scope="module")
def default_adapters(default_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("default-adapters")
    specs = {"d-r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "d-r16-all": dict(r=16, lora_alpha=16, target_modules="all-linear"),
             "d-r64-all": dict(r=64, lora_alpha=32, use_rslora=True, target_modules="all-linear")}
    return {n: make_peft_adapter(default_model_dir, root / n, seed=i, std=0.02, **kw)
            for i, (n, kw) in enumerate(specs.items())}


@pytest.mark.slow
def test_default_model_mixed_adapters_equal_peft(default_model_dir, default_adapters):
    engine = make_engine(default_model_dir, default_adapters, kv_cache_memory=256 << 20)
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?",
                 "Write a haiku about tea.", "What is 7 times 8?"]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in questions]
    jobs = list(zip([*default_adapters, None, "d-r16-all"], prompts))
    expected = [peft_greedy(default_model_dir, default_adapters[a] if a else None, p, 16) for a, p in jobs]
    tokens, logprobs = greedy_with_logprobs(engine, jobs, 16)
    assert tokens == [e[0] for e in expected]
    for got, (_, want) in zip(logprobs, expected):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
def test_cold_adapter_loads_while_other_streams_keep_decoding(default_model_dir, default_adapters):
    """A request for a non-resident adapter waits for its load only; the other streams keep
    getting a token every step while the load runs on the loader thread."""
    engine = make_engine(default_model_dir, default_adapters, kv_cache_memory=256 << 20)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(GenerationRequest(f"base{i}", [1, 2, 3, 4 + i], params))
    for _ in range(3):  # everyone is decoding
        engine.step()
    cold = "d-r64-all"  # the largest adapter: ~78 MB of fp32 weights to read, parse and check
    assert not engine.adapters.residency(engine.adapters.lookup(None, cold))[0]
    engine.add_request(GenerationRequest("cold", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0),
                                         adapter=cold))
    steps_during_load = tokens_during_load = 0
    cold_tokens: list[int] = []
    for _ in range(1000):  # bounded: a load that never lands fails the test instead of hanging it
        outs = engine.step()
        if engine.adapters.residency(engine.adapters.lookup(None, cold))[0]:  # this step's poll took the finished load in
            cold_tokens += [t for o in outs if o.request_id == "cold" for t in o.token_ids]
            break
        steps_during_load += 1
        tokens_during_load += sum(len(o.token_ids) for o in outs if o.request_id.startswith("base"))
        assert all(o.request_id != "cold" for o in outs)
    else:
        pytest.fail("the cold adapter never became resident")
    # Each such step ran while the load was in flight (its poll found it unfinished) and gave
    # every base stream its token.
    assert steps_during_load >= 1 and tokens_during_load == 3 * steps_during_load
    for _ in range(10):
        cold_tokens += [t for o in engine.step() if o.request_id == "cold" for t in o.token_ids]
    assert len(cold_tokens) == 4
    assert engine.metrics.adapter_cache_misses._value.get() >= 1
