"""The engine's greedy tokens equal transformers' `generate(do_sample=False)`, token for token.

fp32 on both sides. The reference runs each prompt alone (batch 1, no padding), so any
cross-talk between the engine's batched, chunked, paged sequences would show.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

NEW_TOKENS = 32


def make_engine(model_dir: Path, kv_bytes: int = 8 << 20, detokenize: bool = True, **sched) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.model.device = "cpu"
    cfg.cache.kv_cache_memory = kv_bytes
    for key, value in sched.items():
        setattr(cfg.scheduler, key, value)
    return LLMEngine(cfg, model_dir, detokenize=detokenize)


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int, stop_at_eos: bool) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    for p in prompts:
        kwargs = {} if stop_at_eos else {"eos_token_id": None, "min_new_tokens": new_tokens}
        ids = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        outs.append(ids[0, len(p):].tolist())
    return outs


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, arrive_at: dict[int, int] | None = None):
    """Submit prompt i before step `arrive_at[i]` (default 0), as tenant i % 3 (so a fair policy
    reorders them); step until all finish."""
    arrive_at = arrive_at or {}
    results: dict[str, list[int]] = {}
    step = 0
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished():
        for i in [i for i in pending if arrive_at.get(i, 0) <= step]:
            engine.add_request(GenerationRequest(f"r{i}", prompts[i], params, tenant=f"t{i % 3}"))
            pending.remove(i)
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return [results[f"r{i}"] for i in range(len(prompts))]


def random_prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


LENGTHS = (1, 3, 7, 16, 17, 33, 50, 90)
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_case(tiny_llama_dir):
    prompts = random_prompts(320, LENGTHS)
    return tiny_llama_dir, prompts, hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS, stop_at_eos=False)


def test_tiny_llama_matches_transformers(llama_case):
    model_dir, prompts, expected = llama_case
    assert run(make_engine(model_dir), prompts, GREEDY) == expected


def test_tiny_qwen2_with_qkv_bias_matches_transformers(tiny_qwen2_dir):
    prompts = random_prompts(320, LENGTHS, seed=1)
    expected = hf_greedy(tiny_qwen2_dir, prompts, NEW_TOKENS, stop_at_eos=False)
    assert run(make_engine(tiny_qwen2_dir), prompts, GREEDY) == expected


# Greedy outputs do not depend on the admission policy (the order only changes which step computes what).
POLICY = pytest.mark.parametrize("scheduling", ["fcfs", "vtc"])


@POLICY
def test_preemption_under_a_tiny_kv_budget_keeps_outputs(llama_case, scheduling):
    model_dir, prompts, expected = llama_case
    # 3 layers x 16 tokens x 2 x 2 heads x 16 dims x 4 bytes = 12 KiB a block; 12 blocks = 192 tokens,
    # far less than the 8 sequences need together, but enough for the longest alone.
    engine = make_engine(model_dir, kv_bytes=12 * 12 * 1024, max_num_batched_tokens=64, scheduling=scheduling)
    assert run(engine, prompts, GREEDY) == expected
    assert engine.metrics.preemptions._value.get() > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks  # every block came back


@POLICY
def test_staggered_arrivals_and_small_prefill_chunks(llama_case, scheduling):
    model_dir, prompts, expected = llama_case
    engine = make_engine(model_dir, max_num_batched_tokens=24, scheduling=scheduling)  # prompts of 33+ tokens span several chunks
    arrive = {i: (0 if i < 4 else 5 + 3 * i) for i in range(len(prompts))}  # half join mid-decode
    assert run(engine, prompts, GREEDY, arrive) == expected


@POLICY
def test_max_num_seqs_limits_the_batch_without_changing_outputs(llama_case, scheduling):
    model_dir, prompts, expected = llama_case
    engine = make_engine(model_dir, max_num_seqs=3, scheduling=scheduling)
    assert run(engine, prompts, GREEDY) == expected
    if scheduling == "vtc":  # the three tenants were charged, and the counters reach the metrics
        counters = engine.scheduler.policy.counters()
        assert set(counters) == {"t0", "t1", "t2"} and min(counters.values()) > 0
        assert engine.metrics.tenant_vtc.labels("t0")._value.get() == counters["t0"]
        # A reload that keeps only t0: the idle tenants' counters and VTC series go (their other
        # series are dropped by Metrics.set_tenants, at the app level).
        engine.set_tenant_weights({"t0": 2.0})
        assert set(engine.scheduler.policy.counters()) == {"t0"}
        text = generate_latest(engine.metrics.registry).decode()
        vtc = "loramux_tenant_virtual_tokens"
        assert f'{vtc}{{tenant="t0"}}' in text and f'{vtc}{{tenant="t1"}}' not in text


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_dir):
    engine = make_engine(default_model_dir, kv_bytes=64 << 20)
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Write a short poem about the sea.", "hi",
                 "Explain gravity to a child in three sentences.", "List five fruits.", "What is 12 times 7?",
                 "Translate 'good morning' into Spanish and explain when to use it.",
                 "Tell me a fun fact about octopuses and why it matters."]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in questions]
    expected = hf_greedy(default_model_dir, prompts, 40, stop_at_eos=True)
    got = run(engine, prompts, SamplingParams(max_tokens=40, temperature=0.0))
    assert got == expected
    assert sum(len(g) for g in got) >= 8 * 12  # real answers, not immediate EOS


def test_a_failure_inside_a_step_fails_only_the_request_that_caused_it(tiny_llama_dir):
    """A request whose data makes the step raise (a seed no generator takes, planted after
    validation as a bug elsewhere could) ends with an error; the sequences sharing its steps
    still get exactly transformers' greedy tokens, and its KV blocks are freed."""
    engine = make_engine(tiny_llama_dir)
    prompts = random_prompts(engine.info.arch.vocab_size, (5, 9, 13, 7), seed=3)
    expected = hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS, stop_at_eos=False)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, greedy))
    poison = GenerationRequest("poison", prompts[1], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, seed=1))
    engine.add_request(poison)
    poison.params = replace(poison.params, seed=2**64)

    tokens: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.error is not None:
                errors[out.request_id] = out.error
    assert list(errors) == ["poison"] and "ValueError" in errors["poison"]
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.allocator.num_used == 0


def test_the_text_level_outside_the_engine_gives_what_the_engine_gives(tiny_llama_dir):
    """The engine core process's split: an engine that does not detokenise, the text level run on
    its outputs (as the server process does), a stop string retiring the request there. Text,
    finish reason, tokens and counts equal the in-process engine's (which detokenises itself)."""
    from server.engine.detokenizer import TextProcessor
    from server.engine.request import FinishReason

    whole, split = make_engine(tiny_llama_dir), make_engine(tiny_llama_dir, detokenize=False)
    text = TextProcessor(split.tokenizer)
    prompts = random_prompts(whole.info.arch.vocab_size, (5, 9, 3, 12), seed=4)
    base = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain = {f"r{i}": out for i, out in enumerate(collect(whole, prompts, [base] * len(prompts)))}
    assert min(len(plain[r][0]) for r in ("r0", "r1")) >= 8
    stops = [replace(base, stop=(plain["r0"][0][4:6],)),
             replace(base, stop=(plain["r1"][0][7:8], plain["r1"][0][2:4]), include_stop_str_in_output=True),
             replace(base, stop_token_ids=(plain["r2"][1][5],)),
             replace(base, stop=("never-there",))]
    expected = collect(whole, prompts, stops)
    assert [e[2] for e in expected][:3] == ["stop"] * 3

    for i, (p, params) in enumerate(zip(prompts, stops)):
        split.add_request(GenerationRequest(f"s{i}", p, params))
        text.add(f"s{i}", p, params)
    got = {f"s{i}": ["", [], None, 0] for i in range(len(prompts))}
    while split.has_unfinished():
        for out in split.step():
            acc = got[out.request_id]
            if acc[2] is not None:
                continue  # retired here by a stop string: a later output is dropped
            assert out.text == ""  # the engine did not detokenise
            if text.process(out):
                split.abort(out.request_id, FinishReason.STOP)
            acc[0] += out.text
            acc[1] += out.token_ids
            acc[3] = out.num_output_tokens
            if out.finished:
                acc[2] = out.finish_reason.value
    assert [tuple(got[f"s{i}"]) for i in range(len(prompts))] == expected
    assert split.num_unfinished == 0 and split.allocator.num_used == 0


def collect(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    """Per prompt: (text, token ids, finish reason, output tokens) as the engine gives them."""
    ids = [f"c{id(params)}-{i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(GenerationRequest(rid, p, sp))
    got = {rid: ["", [], None, 0] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            acc = got[out.request_id]
            acc[0] += out.text
            acc[1] += out.token_ids
            acc[3] = out.num_output_tokens
            if out.finished:
                acc[2] = out.finish_reason.value
    return [tuple(got[rid]) for rid in ids]


def test_default_model_in_bf16_answers_as_transformers_in_bf16(default_model_dir):
    """The README's first prompt, both sides in bfloat16 (what `--dtype auto` picks on CPUs with
    native bf16, and on GPUs): token for token as transformers. The RMSNorm's rounding order
    decides it: normalising and scaling in float32 before rounding once answered "L'Étoile, ..."."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    want = out[0, len(prompt):].tolist()
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "bfloat16", "cpu", 64 << 20
    cfg.lora.enabled = False
    engine = LLMEngine(cfg, default_model_dir)
    engine.add_request(GenerationRequest("r", prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    got: list[int] = []
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.token_ids]
    assert tok.decode(want).startswith("The capital of France is Paris")
    assert got == want
