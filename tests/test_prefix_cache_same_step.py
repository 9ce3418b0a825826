"""Prompt blocks one step computes for a sequence are not computed again beside it for another
(`Scheduler._shares_this_step`): `n` choices of one prompt, or a burst on a new system prompt,
compute the shared part once; the tokens stay transformers'."""

from __future__ import annotations

import pytest
import torch
from engine_runs import cpu_engine
from test_prefix_cache_engine import run

from server.engine.request import GenerationRequest, SamplingParams

BLOCK = 16  # the engine's default block size


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 320, (n,), generator=g).tolist()


def computed_per_step(engine) -> list[int]:
    """Tokens each step computes, appended as the engine schedules."""
    steps: list[int] = []
    schedule = engine.scheduler.schedule

    def counted():
        out = schedule()
        if not out.is_empty:
            steps.append(out.num_tokens)
        return out
    engine.scheduler.schedule = counted
    return steps


def greedy_run(engine, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[int]]:
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    cached: dict[str, int] = {}
    got = run(engine, [[GenerationRequest(f"r{i}", p, greedy) for i, p in enumerate(prompts)]], cached)
    return [got[f"r{i}"] for i in range(len(prompts))], [cached[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_identical_prompts_submitted_together_compute_it_once(tiny_llama_dir, async_scheduling):
    """Three copies of a 70-token prompt at once (as `n` = 3), with room to admit all three in
    one step: the first computes it, the others wait one step and compute only the partial
    last block (before: all three computed all 70 tokens in the first step)."""
    from test_engine import hf_greedy

    prompt, new = tokens(70, seed=41), 6
    engine = cpu_engine(tiny_llama_dir, max_num_seqs=4, max_num_batched_tokens=256,
                        async_scheduling=async_scheduling)
    steps = computed_per_step(engine)
    got, cached = greedy_run(engine, [prompt] * 3, new)
    assert got == hf_greedy(tiny_llama_dir, [prompt], new, stop_at_eos=False) * 3
    assert cached == [0, 64, 64]
    assert sum(steps) == 70 + 2 * 6 + 3 * (new - 1), steps


def test_a_chunked_prompt_is_followed_not_duplicated(tiny_llama_dir):
    """A 200-token prompt chunked 128 tokens a step, and the same prompt submitted with it: the
    second finds the first chunk's 8 blocks cached when the first computes its last 72 tokens;
    it waits for those too rather than compute them beside it (before: 56 of them again), then
    takes all 12 full blocks."""
    from test_engine import hf_greedy

    prompt, new = tokens(200, seed=42), 4
    engine = cpu_engine(tiny_llama_dir, max_num_seqs=4, max_num_batched_tokens=128)
    steps = computed_per_step(engine)
    got, cached = greedy_run(engine, [prompt, prompt], new)
    assert got == hf_greedy(tiny_llama_dir, [prompt], new, stop_at_eos=False) * 2
    assert cached == [0, 12 * BLOCK]
    assert sum(steps) == 200 + 8 + 2 * (new - 1), steps


def test_a_short_shared_prefix_does_not_hold_back_a_long_prompt(tiny_llama_dir):
    """One shared block before 100 tokens of each prompt's own: waiting a step to save 16 of
    116 tokens is not worth it, so both are admitted in the first step."""
    shared = tokens(BLOCK, seed=43)
    prompts = [shared + tokens(100, seed=44), shared + tokens(100, seed=45)]
    engine = cpu_engine(tiny_llama_dir, max_num_seqs=4, max_num_batched_tokens=256)
    steps = computed_per_step(engine)
    _, cached = greedy_run(engine, prompts, 2)
    assert cached == [0, 0]
    assert steps[0] == 2 * 116, steps


def test_off_without_prefix_caching(tiny_llama_dir):
    prompt = tokens(70, seed=41)
    engine = cpu_engine(tiny_llama_dir, max_num_seqs=4, max_num_batched_tokens=256, prefix_caching=False)
    steps = computed_per_step(engine)
    _, cached = greedy_run(engine, [prompt] * 3, 2)
    assert cached == [0, 0, 0] and steps[0] == 3 * 70
