"""The device adapter pool sized in bytes: no fixed cap of adapters per step.

A step carries as many distinct adapters as the pool holds (each token equal to PEFT running
its adapter alone); an adapter the step uses is never evicted by it; slots come back after
register / run / unregister churn. References come from PEFT, never from this server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters.peft_format import load_peft_adapter
from server.adapters.slots import LoraSlots
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams
from server.metrics import Metrics
from server.model.arch import ModelArch

from engine_runs import greedy_with_logprobs, warm
from experts_runs import run_triton_child
from peft_adapters import make_peft_adapter, peft_greedy

MANY = 44  # more distinct adapters in one step than the old default cap (8) or vLLM's max_loras
NEW = 4
RANKS = (1, 2, 4, 8, 16, 32)
TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear",
           ["gate_proj", "up_proj", "down_proj"], ["o_proj", "down_proj"])


@pytest.fixture(scope="module")
def many_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    return {f"m{i}": make_peft_adapter(tiny_llama_dir, root / f"m{i}", seed=100 + i, r=RANKS[i % len(RANKS)],
                                       lora_alpha=2 * RANKS[i % len(RANKS)], target_modules=TARGETS[i % len(TARGETS)])
            for i in range(MANY)}


def engine_for(model_dir: Path, adapters: dict[str, Path], device: str = "cpu", **lora) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", device, 16 << 20
    cfg.scheduler.max_num_seqs = 64
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapters.items()}
    cfg.lora.max_lora_rank = max(RANKS)
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return LLMEngine(cfg, model_dir)


def one_slot(model_dir: Path, rank: int = max(RANKS)) -> int:
    return LoraSlots.slot_nbytes(ModelArch.from_dir(model_dir), rank, torch.float32)


def spy_step_sizes(engine: LLMEngine) -> list[int]:
    """Record how many distinct adapters each step placed (wraps the instance's activate)."""
    sizes: list[int] = []
    activate = engine.adapters.activate

    def recording(refs):
        refs = list(refs)
        sizes.append(len(refs))
        return activate(refs)

    engine.adapters.activate = recording
    return sizes


def test_pool_slots_come_from_the_byte_budget(tiny_llama_dir):
    arch = ModelArch.from_dir(tiny_llama_dir)
    one = LoraSlots.slot_nbytes(arch, 16, torch.float32)
    # independently: per layer and adapted linear, A is [16, in] and B [out, 16], its Arrow prototype
    # [in] (the LoRA dtype) and flag (1 byte), its DoRA rescale [out] (float32)
    per_layer = sum((16 * i + o * 16 + i) * 4 + 1 + o * 4 for i, o in map(arch.linear_shape, arch.lora_targets))
    assert one == arch.num_layers * per_layer
    sized = LoraSlots.sized(arch, int(3.5 * one), 16, torch.float32, torch.device("cpu"), Metrics(), max_slots=64)
    assert sized.num_slots == 3 and sized.nbytes == 3 * one
    capped = LoraSlots.sized(arch, 100 * one, 16, torch.float32, torch.device("cpu"), Metrics(), max_slots=5)
    assert capped.num_slots == 5
    with pytest.raises(ValueError, match="holds no adapter"):
        LoraSlots.sized(arch, one - 1, 16, torch.float32, torch.device("cpu"), Metrics(), max_slots=64)


def test_more_adapters_in_one_step_than_any_fixed_cap_equal_peft(tiny_llama_dir, many_adapters):
    """44 adapters of ranks 1..32 on different modules, one request each, all in the same steps."""
    g = torch.Generator().manual_seed(3)
    jobs = [(name, torch.randint(2, 320, (int(n),), generator=g).tolist())
            for name, n in zip(many_adapters, torch.randint(3, 9, (MANY,), generator=g))]
    jobs += [(None, [7, 8, 9])]  # a base-only request in the same batch
    engine = engine_for(tiny_llama_dir, many_adapters)
    assert engine.scheduler.max_loras == engine.adapters.step_capacity >= MANY  # the pool's capacity
    warm(engine, many_adapters)
    sizes = spy_step_sizes(engine)
    tokens, logprobs = greedy_with_logprobs(engine, jobs, NEW)
    assert max(sizes) == MANY, sizes  # every adapter in one step
    for (adapter, prompt), got, lp in zip(jobs, tokens, logprobs):
        want, want_lp = peft_greedy(tiny_llama_dir, many_adapters[adapter] if adapter else None, prompt, NEW)
        assert got == want, adapter
        assert lp == pytest.approx(want_lp, abs=2e-4), adapter
    assert engine.metrics.adapter_evictions.labels("device")._value.get() == 0


def test_max_loras_is_an_optional_per_step_limit(tiny_llama_dir, many_adapters):
    few = dict(list(many_adapters.items())[:6])
    engine = engine_for(tiny_llama_dir, few, max_loras=2)
    assert engine.adapters.step_capacity == 2 and engine.scheduler.max_loras == 2
    warm(engine, few)  # else the loads pace admissions and two adapters may never share a step
    sizes = spy_step_sizes(engine)
    jobs = [(name, [3, 4, 5, 6]) for name in few]
    tokens, _ = greedy_with_logprobs(engine, jobs, NEW)
    assert max(sizes) == 2
    assert tokens[0] == peft_greedy(tiny_llama_dir, few["m0"], [3, 4, 5, 6], NEW)[0]


def test_a_small_pool_schedules_and_evicts_only_unused_adapters(tiny_llama_dir, many_adapters):
    """A pool of 3 slots (from its bytes) for 9 adapters: steps take at most 3, the slots are
    rewritten, and every token still equals PEFT (an in-use slot overwritten would not)."""
    nine = dict(list(many_adapters.items())[:9])
    engine = engine_for(tiny_llama_dir, nine, lora_pool_memory=int(3.5 * one_slot(tiny_llama_dir)))
    assert engine.adapters.step_capacity == 3
    warm(engine, nine)  # in the host cache, not all in the pool: else load timing decides how many share a step
    sizes = spy_step_sizes(engine)
    jobs = [(name, [11, 12 + i, 13]) for i, name in enumerate(nine)]
    tokens, _ = greedy_with_logprobs(engine, jobs, NEW)
    assert max(sizes) == 3
    assert engine.metrics.adapter_evictions.labels("device")._value.get() > 0
    for (name, prompt), got in zip(jobs, tokens):
        assert got == peft_greedy(tiny_llama_dir, nine[name], prompt, NEW)[0], name


def _slot_holds(slots: LoraSlots, slot: int, adapter) -> bool:
    """The pool's copy of every module of `adapter` in `slot` (B pre-scaled), read back."""
    R = slots.max_rank
    for (layer, module), w in adapter.modules.items():
        group, i = slots._slice_of[module]
        lo, hi = slots.offsets[group][i], slots.offsets[group][i + 1]
        if not torch.equal(slots.a[group][layer, slot, i * R:i * R + w.rank], w.a):
            return False
        if not torch.allclose(slots.b[group][layer, slot, lo:hi, :w.rank], w.b * w.scale):
            return False
    return True


def test_activate_never_evicts_an_adapter_of_the_step(tiny_llama_dir, many_adapters):
    arch = ModelArch.from_dir(tiny_llama_dir)
    w = {n: load_peft_adapter(p, arch, name=n, max_rank=32) for n, p in list(many_adapters.items())[:6]}
    slots = LoraSlots(arch, 3, 32, torch.float32, torch.device("cpu"), Metrics())
    steps = [("m0", "m1", "m2"), ("m2", "m3"), ("m1", "m3", "m4"), ("m4", "m5", "m0"), ("m0", "m5", "m1")]
    for step in steps:
        placed = slots.activate({n: w[n] for n in step})
        assert len(set(placed.values())) == len(step)
        for n in step:  # every adapter of the step is in its slot, intact
            assert _slot_holds(slots, placed[n], w[n]), (step, n)
    with pytest.raises(ValueError, match="has 3 slots"):
        slots.activate({n: w[n] for n in ("m0", "m1", "m2", "m3")})


def test_no_pool_slot_leaks_after_churn(tiny_llama_dir, many_adapters, tmp_path):
    """Register, run and unregister 24 adapter versions through a 4-slot pool (some unregistered
    while their request still runs): afterwards the pool is empty and all its slots are usable."""
    src = list(many_adapters.values())[:8]
    engine = engine_for(tiny_llama_dir, {}, lora_pool_memory=int(4.5 * one_slot(tiny_llama_dir)),
                        allowed_adapter_roots=[str(src[0].parent)])
    manager = engine.adapters
    assert manager.step_capacity == 4 and manager.pool_resident == 0
    for round_ in range(3):
        names = [f"c{round_}-{i}" for i in range(len(src))]
        for name, path in zip(names, src):
            manager.load_path(None, name, str(path))
        jobs = [(name, [4, 5, 6 + i]) for i, name in enumerate(names)]
        greedy_with_logprobs(engine, jobs[:4], NEW)  # the first half to completion
        for name in names[:4]:
            manager.unregister(None, name)
        for i, (name, prompt) in enumerate(jobs[4:]):  # the rest: unregistered mid-run
            engine.add_request(GenerationRequest(f"d{round_}-{i}", prompt,
                                                 SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
                                                 adapter=name))
        engine.step()
        engine.step()
        assert 0 < manager.pool_resident <= 4
        for name in names[4:]:
            manager.unregister(None, name)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
        assert manager.pool_resident == 0, round_
    # every slot can be taken again
    manager.load_path(None, "again", str(src[0]))
    tokens, _ = greedy_with_logprobs(engine, [("again", [9, 9, 9])], NEW)
    assert tokens[0] == peft_greedy(tiny_llama_dir, src[0], [9, 9, 9], NEW)[0]
    assert manager.pool_resident == 1


def test_rank_unit_pages_fit_more_adapters_in_one_step_equal_peft(tiny_llama_dir, many_adapters):
    """The Triton backend's paged pool (under the interpreter, in a child): a pool of the bytes of
    6 rank-32 slots, in pages of rank 4, serves 12 adapters of ranks 1..32 in one step (their 34
    pages fit; 12 rank-32 slots would not), each token equal to PEFT running its adapter alone."""
    pytest.importorskip("triton")
    twelve = dict(list(many_adapters.items())[:12])
    jobs = [(name, [5 + i, 6, 7]) for i, name in enumerate(twelve)]
    new = 2
    payload = {"model": str(tiny_llama_dir), "adapters": {n: str(p) for n, p in twelve.items()},
               "jobs": jobs, "new": new,
               "lora": {"max_lora_rank": max(RANKS), "lora_page_rank": 4,
                        "lora_pool_memory": 6 * one_slot(tiny_llama_dir)}}
    got = run_triton_child(payload)
    assert got["lora"] == "triton" and got["page_rank"] == 4
    assert max(len(step) for step in got["steps"]) == len(jobs)  # all twelve in one step
    for (name, prompt), tokens in zip(jobs, got["tokens"]):
        assert tokens == peft_greedy(tiny_llama_dir, twelve[name], prompt, new)[0], name
