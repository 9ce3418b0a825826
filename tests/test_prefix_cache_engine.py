"""The prefix cache through the engine (server/engine/kv_cache.py as the scheduler and engine use
it): greedy tokens with prefix hits equal transformers' and PEFT's (an adapter's request never
reads the base's blocks), through preemption and async scheduling, tenants removed, adapters
reloaded and lost steps, and the hits show in vLLM's counters. The allocator alone:
tests/test_kv_cache.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

from engine_runs import cpu_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def make(model_dir: Path, *, prefix_caching: bool = True, async_scheduling: bool = False, kv_bytes: int = 8 << 20,
         adapters: dict[str, Path] | None = None, adapter_roots: tuple[Path, ...] = ()) -> LLMEngine:
    return cpu_engine(model_dir, adapters, kv_bytes=kv_bytes, max_num_batched_tokens=48,
                      async_scheduling=async_scheduling, prefix_caching=prefix_caching,
                      adapter_roots=adapter_roots)


def run(engine: LLMEngine, waves: list[list[GenerationRequest]], cached: dict[str, int] | None = None,
        ) -> dict[str, list[int]]:
    """Each wave submitted once the one before has finished; every request's tokens (and into
    `cached`, the prompt tokens its outputs say the prefix cache held)."""
    got: dict[str, list[int]] = {}
    for wave in waves:
        for r in wave:
            engine.add_request(r)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                got.setdefault(out.request_id, []).extend(out.token_ids)
                if cached is not None:
                    cached[out.request_id] = out.num_cached_tokens
    assert engine.allocator.num_used == 0
    return got


def counter(engine: LLMEngine, name: str) -> float:
    return engine.metrics.registry.get_sample_value(name, {"model_name": engine.info.model_name, "engine": "0"})


SYSTEM = 37  # shared prompt tokens: 2 full blocks of 16, and 5 tokens in a third


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(2, 320, (SYSTEM,), generator=g).tolist()
    return [system + torch.randint(2, 320, (3 + 4 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_tokens_with_prefix_hits_equal_transformers(tiny_llama_dir, async_scheduling):
    """Three waves over a shared system prompt: the later waves find its blocks (and a whole earlier
    prompt, asked again), compute only the rest, and decode exactly transformers' tokens."""
    from test_engine import hf_greedy

    ps = prompts(5, seed=21)
    new = 12
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    reqs = [GenerationRequest(f"r{i}", p, greedy) for i, p in enumerate(ps)]
    waves = [reqs[:1], reqs[1:4], [reqs[4], replace(reqs[0], request_id="again")]]
    engine = make(tiny_llama_dir, async_scheduling=async_scheduling)
    got = run(engine, waves)
    expected = hf_greedy(tiny_llama_dir, ps, new, stop_at_eos=False)
    assert [got[f"r{i}"] for i in range(5)] == expected and got["again"] == expected[0]
    hits = counter(engine, "vllm:prefix_cache_hits_total")
    # the system prompt's 2 full blocks, for each request after the first (its third block differs)
    assert hits == 5 * 2 * 16, hits
    assert counter(engine, "vllm:prefix_cache_queries_total") == sum(len(p) for p in ps) + len(ps[0])

    off = make(tiny_llama_dir, prefix_caching=False)
    assert run(off, waves) == got
    assert counter(off, "vllm:prefix_cache_hits_total") == counter(off, "vllm:prefix_cache_queries_total") == 0


def test_an_adapter_request_never_reads_the_base_models_blocks(tiny_llama_dir, tmp_path):
    """The same prompt on the base, then on an adapter (on k/v: its K/V differ), then on the base
    again: PEFT's and transformers' tokens; only the last one hits."""
    from peft_adapters import make_peft_adapter, peft_greedy

    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "kv", seed=5, std=0.2, r=8, lora_alpha=16,
                                target_modules=["k_proj", "v_proj"])
    p = prompts(1, seed=22)[0]
    new = 10
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine = make(tiny_llama_dir, adapters={"kv": adapter})
    cached: dict[str, int] = {}
    got = run(engine, [[GenerationRequest("base", p, greedy)], [GenerationRequest("lora", p, greedy, adapter="kv")],
                       [GenerationRequest("base2", p, greedy)]], cached)
    assert cached == {"base": 0, "lora": 0, "base2": 2 * 16}
    assert got["lora"] == peft_greedy(tiny_llama_dir, adapter, p, new)[0]
    assert got["base"] == got["base2"] == peft_greedy(tiny_llama_dir, None, p, new)[0]
    assert got["lora"] != got["base"]  # the adapter changes the answer: reading the base's K/V would show
    assert counter(engine, "vllm:prefix_cache_hits_total") == 2 * 16


def test_preemption_with_cached_blocks_keeps_transformers_tokens(tiny_llama_dir):
    """A cache too small for the batch: sequences are preempted, their cached blocks evicted or
    found again when they come back; every request still gets transformers' tokens."""
    from server.engine.model_runner import KVCache
    from test_engine import hf_greedy

    probe = make(tiny_llama_dir)
    arch = probe.info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, probe.info.block_size, arch.num_kv_heads, arch.head_dim,
                                        torch.float32)
    ps = prompts(6, seed=23)
    new = 24
    engine = make(tiny_llama_dir, kv_bytes=10 * per_block)
    preempted = []
    schedule = engine.scheduler.schedule

    def counted():
        out = schedule()
        preempted.extend(out.preempted)
        return out
    engine.scheduler.schedule = counted
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    got = run(engine, [[GenerationRequest(f"r{i}", p, greedy) for i, p in enumerate(ps)]])
    assert preempted, "nothing was preempted"
    assert [got[f"r{i}"] for i in range(6)] == hf_greedy(tiny_llama_dir, ps, new, stop_at_eos=False)
    assert counter(engine, "vllm:prefix_cache_hits_total") > 0


def test_the_flag_turns_it_off():
    from server.cli import build_config, make_parser

    assert build_config(make_parser().parse_args(["serve"])).cache.prefix_caching is True
    assert build_config(make_parser().parse_args(["serve", "--no-prefix-caching"])).cache.prefix_caching is False


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_lost_at_read_back_leaves_no_block_cached(tiny_llama_dir, monkeypatch, async_scheduling):
    """A step whose tokens cannot be read back (a device fault shows only then) may not have written
    the K/V of the blocks registered at its launch: none of them may be found again. The same
    prompt asked after it computes its blocks anew and gets transformers' tokens."""
    from server.engine.sampler import SampledStep
    from test_engine import hf_greedy

    output, faults = SampledStep.output, [1]

    def faulty(self):
        if faults:
            faults.pop()
            raise RuntimeError("device fault")
        return output(self)
    monkeypatch.setattr(SampledStep, "output", faulty)
    p = prompts(1, seed=24)[0]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = make(tiny_llama_dir, async_scheduling=async_scheduling)
    engine.add_request(GenerationRequest("lost", p, greedy))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason.value for o in outs if o.finished] == ["error"]
    assert engine.allocator.num_cached == 0
    cached: dict[str, int] = {}
    got = run(engine, [[GenerationRequest("again", p, greedy)]], cached)
    assert cached == {"again": 0} and got["again"] == hf_greedy(tiny_llama_dir, [p], 6, stop_at_eos=False)[0]


def test_a_tenant_gone_from_the_table_takes_the_prefix_cache_with_it(tiny_llama_dir):
    """A tenant is its name in the cache's namespace: once a reload drops it, a new tenant given
    the same name must not find its blocks. Weights changing alone keep the cache."""
    engine = make(tiny_llama_dir)
    p = prompts(1, seed=24)[0]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.set_tenant_weights({"acme": 1.0, "initech": 1.0})
    cached: dict[str, int] = {}
    run(engine, [[GenerationRequest("a1", p, greedy, tenant="acme")]])
    engine.set_tenant_weights({"acme": 2.0, "initech": 1.0})
    run(engine, [[GenerationRequest("a2", p, greedy, tenant="acme")]], cached)
    assert cached["a2"] == 2 * 16
    engine.set_tenant_weights({"initech": 1.0})  # acme removed ...
    engine.set_tenant_weights({"acme": 1.0, "initech": 1.0})  # ... and the name given again
    run(engine, [[GenerationRequest("a3", p, greedy, tenant="acme")]], cached)
    assert cached["a3"] == 0


def test_a_prompt_whose_cached_prefix_fills_the_cache_is_admitted_again(tiny_llama_dir):
    """A prompt as long as the cache allows, asked again once the first has finished: its cached
    prefix is every block but one, idle, and admitting it takes them all. With nothing else
    running, the admission watermark (blocks kept back for running sequences to grow) must not
    keep it out: it did, forever (an idle engine with a request it never runs)."""
    from server.engine.model_runner import KVCache
    from test_engine import hf_greedy

    probe = make(tiny_llama_dir)
    arch = probe.info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, 16, arch.num_kv_heads, arch.head_dim, torch.float32)
    engine = make(tiny_llama_dir, kv_bytes=8 * per_block)  # 128 tokens: max_model_len
    assert engine.info.max_model_len == 128 and engine.scheduler.watermark == 1
    p = torch.randint(2, 320, (120,), generator=torch.Generator().manual_seed(25)).tolist()
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cached: dict[str, int] = {}
    got: dict[str, list[int]] = {}
    for rid in ("first", "again"):
        engine.add_request(GenerationRequest(rid, p, greedy))
        for _ in range(40):  # bounded: a request never admitted would spin here
            for out in engine.step():
                got.setdefault(rid, []).extend(out.token_ids)
                cached[rid] = out.num_cached_tokens
            if not engine.has_unfinished():
                break
        assert not engine.has_unfinished(), f"{rid} was never admitted"
    assert cached == {"first": 0, "again": 7 * 16}
    assert got["first"] == got["again"] == hf_greedy(tiny_llama_dir, [p], 8, stop_at_eos=False)[0]


def test_blocks_a_removed_tenants_running_request_computes_after_the_reload_stay_its_own(tiny_llama_dir):
    """A reload drops a tenant while its request waits: the request runs on, and the blocks it
    computes after the reload must not be found by a new tenant given the same name (they were:
    the reload emptied the cache, then the old request filled it again under the name)."""
    engine = make(tiny_llama_dir)
    p = torch.randint(2, 320, (150,), generator=torch.Generator().manual_seed(26)).tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.set_tenant_weights({"acme": 1.0, "initech": 1.0})
    engine.add_request(GenerationRequest("old", p, greedy, tenant="acme"))
    engine.set_tenant_weights({"initech": 1.0})  # acme removed ...
    run(engine, [[]])  # ... its request computes the rest of its prompt
    engine.set_tenant_weights({"acme": 1.0, "initech": 1.0})  # ... and the name given to someone else
    cached: dict[str, int] = {}
    run(engine, [[GenerationRequest("new", p, greedy, tenant="acme")]], cached)
    assert cached["new"] == 0


def test_an_adapter_loaded_again_under_its_name_never_reads_the_old_weights_blocks(tiny_llama_dir, tmp_path):
    """Unload an adapter and load other weights under the same name: the same prompt on it must
    compute its blocks anew (the cache's namespace is the adapter's version, not its name) and
    give PEFT's tokens for the new weights."""
    from peft_adapters import make_peft_adapter, peft_greedy

    kw = dict(std=0.2, r=8, lora_alpha=16, target_modules=["k_proj", "v_proj"])
    old = make_peft_adapter(tiny_llama_dir, tmp_path / "old", seed=6, **kw)
    new = make_peft_adapter(tiny_llama_dir, tmp_path / "new", seed=7, **kw)
    engine = make(tiny_llama_dir, adapters={"kv": old}, adapter_roots=(tmp_path,))
    p = prompts(1, seed=27)[0]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cached: dict[str, int] = {}
    got = run(engine, [[GenerationRequest("old", p, greedy, adapter="kv")],
                       [GenerationRequest("old2", p, greedy, adapter="kv")]], cached)
    engine.adapters.unregister(None, "kv")
    engine.adapters.load_path(None, "kv", str(new))
    got |= run(engine, [[GenerationRequest("new", p, greedy, adapter="kv")]], cached)
    assert cached == {"old": 0, "old2": 2 * 16, "new": 0}
    assert got["old"] == got["old2"] == peft_greedy(tiny_llama_dir, old, p, 8)[0]
    assert got["new"] == peft_greedy(tiny_llama_dir, new, p, 8)[0] != got["old"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_step_lost_at_read_back_ends_every_request_that_reads_what_it_wrote(tiny_llama_dir, monkeypatch,
                                                                                async_scheduling):
    """A lost step (its tokens cannot be read back) may not have written its K/V (simulated: the
    cache is wiped when the fault shows). Besides the request it sampled for, it held a prompt
    mid-prefill, and (async) the step launched after it continued that prompt and admitted another
    one onto the blocks it had just registered: all of them end in error instead of running on
    over K/V that is not there (they ran on, to tokens transformers does not give); a request that
    arrives after the fault (sync) runs. The same prompts asked after get transformers' tokens."""
    from server.engine.sampler import SampledStep
    from test_engine import hf_greedy

    output, faults = SampledStep.output, [1]
    engine = make(tiny_llama_dir, async_scheduling=async_scheduling)

    def faulty(self):
        if faults:
            faults.pop()
            engine.kv_cache.tensor.normal_(0.0, 30.0)  # what the lost writes leave: not the K/V
            raise RuntimeError("device fault")
        return output(self)
    monkeypatch.setattr(SampledStep, "output", faulty)
    g = torch.Generator().manual_seed(28)
    short = torch.randint(2, 320, (7,), generator=g).tolist()
    long = torch.randint(2, 320, (60,), generator=g).tolist()  # 41 tokens with short's 7 (budget 48), then 19
    twin = long[:40] + torch.randint(2, 320, (5,), generator=g).tolist()  # starts with 2 of long's blocks
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest("short", short, greedy))
    engine.add_request(GenerationRequest("long", long, greedy))
    finish: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    for step in range(40):
        if step == 1:  # sync: after the lost step was taken in; async: admitted by the step after it
            engine.add_request(GenerationRequest("twin", twin, greedy))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason.value
        if step and not engine.has_unfinished():
            break
    ps = [short, long, twin]
    expected = hf_greedy(tiny_llama_dir, ps, 5, stop_at_eos=False)
    assert finish == {"short": "error", "long": "error", "twin": "error" if async_scheduling else "length"}
    assert async_scheduling or tokens["twin"] == expected[2]
    assert engine.allocator.num_used == 0
    got = run(engine, [[GenerationRequest(f"again{i}", p, greedy) for i, p in enumerate(ps)]])
    assert [got[f"again{i}"] for i in range(3)] == expected
