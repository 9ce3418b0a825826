"""Prefix caching over random workloads (server/engine/kv_cache.py): requests sharing system
prompts (whole, cut mid-block, exactly at a block's end, asked again), over the base and two
adapters and two tenants, arriving as others run, aborted, stopped by stop ids, with seeded
sampling and penalties, over a KV cache small enough to preempt. With the cache on, sync or
async, every request gets the tokens, logprobs' token ids and finish it gets with the cache off;
the cache is hit, and after every step the allocator's reference counts and free lists match the
block tables (and every block is back at the end: test_async_scheduling's `drive` checks)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from server.engine.request import GenerationRequest

from engine_runs import cpu_engine
from test_async_scheduling import adapter_dirs, drive, random_params  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shared_prefix_workload(seed: int) -> list[tuple[int, int | None, GenerationRequest]]:
    """(arrival step, abort once it has this many tokens or None, request)."""
    rnd = random.Random(seed)
    systems = [[rnd.randint(2, 319) for _ in range(n)] for n in (5, 16, 32, 47)]
    work: list[tuple[int, int | None, GenerationRequest]] = []
    for i in range(rnd.randint(12, 18)):
        if work and rnd.random() < 0.3:  # a prompt asked again, maybe by another tenant or adapter
            prompt = list(rnd.choice(work)[2].prompt_token_ids)
        else:  # a system prompt, whole or cut (at a block's end, just past it, anywhere), and a question
            system = rnd.choice(systems)
            cut = rnd.choice([len(system), len(system), 15, 16, 17, 32, rnd.randint(1, len(system))])
            prompt = system[:cut] + [rnd.randint(2, 319) for _ in range(rnd.choice([0, 0, 1, 5, 16, 21]))]
        sp = random_params(rnd, max_tokens=24, greedy=0.5, sampled=0.9, greedy_logprobs=[None, 2],
                           stops=0.2, stop_ids=30)
        abort = rnd.choice([0, 1, 2, 5]) if rnd.random() < 0.25 else None
        work.append((rnd.randint(0, 30), abort, GenerationRequest(
            f"r{i}", prompt, sp, adapter=rnd.choice([None, None, None, "a", "b"]),
            tenant=rnd.choice(["t1", "t1", "t1", "t2"]))))
    return work


def check_blocks(engine) -> None:
    """The allocator's books match the sequences: each block's reference count is the number of
    block tables holding it; the blocks none holds are each free or evictable (cached) once."""
    alloc = engine.allocator
    holders = Counter(b for s in engine._seqs.values() for b in s.block_table)
    assert alloc._refs == [holders[b] for b in range(alloc.num_blocks)]
    idle = [*alloc._free, *alloc._evictable]
    assert sorted(idle) == [b for b in range(alloc.num_blocks) if not holders[b]]
    assert set(alloc._evictable) <= set(alloc._digest_of) and not set(alloc._free) & set(alloc._digest_of)


def test_random_shared_prefix_workloads_equal_the_engine_without_the_cache(tiny_llama_dir, adapter_dirs):  # noqa: F811
    from server.engine.model_runner import KVCache
    from server.engine.policies import VTCPolicy

    arch = cpu_engine(tiny_llama_dir).info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, 16, arch.num_kv_heads, arch.head_dim, torch.float32)
    hits = preempted = 0
    configs = ((1, 9, 4, False), (2, 8, 6, True), (3, 12, 4, True), (4, 20, 4, False), (5, 40, 4, False),
               (6, 40, 6, True))  # (seed, KV blocks, max_num_seqs, vtc)
    for seed, blocks, max_num_seqs, vtc in configs:
        work = shared_prefix_workload(seed)
        got = {}
        for caching, async_scheduling in ((False, False), (True, False), (True, True)):
            engine = cpu_engine(tiny_llama_dir, adapter_dirs, kv_bytes=blocks * per_block, max_num_seqs=max_num_seqs,
                                async_scheduling=async_scheduling, prefix_caching=caching)
            if vtc:
                engine.scheduler.policy = VTCPolicy(input_weight=1.0, output_weight=2.0)
            schedule = engine.scheduler.schedule

            def counted(schedule=schedule):
                nonlocal preempted
                out = schedule()
                preempted += len(out.preempted)
                return out
            engine.scheduler.schedule = counted
            step = engine.step

            def checked(step=step, engine=engine):
                outputs = step()
                check_blocks(engine)
                return outputs
            engine.step = checked
            got[caching, async_scheduling] = drive(engine, work)
            hits += engine.metrics.registry.get_sample_value(
                "vllm:prefix_cache_hits_total", {"model_name": engine.info.model_name, "engine": "0"})
        assert got[True, False] == got[False, False], seed
        assert got[True, True] == got[False, False], seed
    assert hits and preempted, (hits, preempted)


def experts_workload(seed: int) -> list[tuple[int, int | None, GenerationRequest]]:
    """shared_prefix_workload with some requests made mixtures or routes over the two adapters, and
    some asked as n > 1 choices (copies arriving together, seed + i, as the API sends them)."""
    from server.engine.request import Mixture, Route

    rnd = random.Random(seed + 1000)
    work = []
    for at, abort, r in shared_prefix_workload(seed):
        x = rnd.random()
        if x < 0.2:
            r = replace(r, adapter=None, experts=Mixture(("a", "b"), (rnd.choice([0.5, -0.7, 1.0]), 1.0)))
        elif x < 0.3:
            r = replace(r, adapter=None, experts=Route(("a", "b"), top_k=1, temperature=1.0))
        work.append((at, abort, r))
        if rnd.random() < 0.25:
            for i in range(1, 3):
                params = replace(r.params, seed=None if r.params.seed is None else r.params.seed + i)
                work.append((at, None, replace(r, request_id=f"{r.request_id}-{i}", params=params)))
    return work


def test_mixtures_routes_choices_and_a_reload_equal_the_engine_without_the_cache(
        tiny_llama_dir, adapter_dirs, tmp_path):  # noqa: F811
    """As above, with mixtures and routes (their namespace: every expert's version and the weights),
    n > 1 choices of one prompt admitted together, prefill chunks shorter than a block, and adapter
    "b" unloaded and loaded again with other weights while its requests run (the old version
    drains): the cache on, sync or async, gives every request what the engine without it gives."""
    import shutil

    from server.engine.model_runner import KVCache

    other = shutil.copytree(adapter_dirs["a"], tmp_path / "b2")  # "b" again, with a's weights
    arch = cpu_engine(tiny_llama_dir).info.arch
    per_block = KVCache.bytes_per_block(arch.num_layers, 16, arch.num_kv_heads, arch.head_dim, torch.float32)
    for seed, blocks, budget, reload_at in ((11, 12, 13, 4), (12, 40, 8, 9), (13, 9, 32, 2)):
        work = experts_workload(seed)
        got = {}
        for caching, async_scheduling in ((False, False), (True, False), (True, True)):
            engine = cpu_engine(tiny_llama_dir, adapter_dirs, kv_bytes=blocks * per_block, max_num_seqs=4,
                                max_num_batched_tokens=budget, async_scheduling=async_scheduling,
                                prefix_caching=caching, adapter_roots=(tmp_path,))
            step, steps = engine.step, [0]

            def checked(step=step, engine=engine, steps=steps):
                if steps[0] == reload_at:
                    engine.adapters.unregister(None, "b")
                    engine.adapters.load_path(None, "b", str(other))
                steps[0] += 1
                outputs = step()
                check_blocks(engine)
                return outputs
            engine.step = checked
            got[caching, async_scheduling] = drive(engine, work)
        assert got[True, False] == got[False, False], seed
        assert got[True, True] == got[False, False], seed
