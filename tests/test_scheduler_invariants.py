"""Random workloads on the real Scheduler, BlockAllocator and VTC policy, driven as the async
engine drives them (step N+1 scheduled before step N's tokens are taken in), with aborts, stop
tokens, a KV cache small enough to preempt often, prefix caching and the distinct-adapter budget.
Pure Python, no model. Checked every step or at the end:
  - progress: some step computes something within a few steps whenever work is left, and all
    work ends (no request that can never be scheduled, no preemption loop);
  - VTC's per-tenant count of active requests is exactly who is waiting or running;
  - one tenant's counter is exactly w_p * prompt tokens first computed + w_q * output tokens
    delivered (recomputes after preemption are free; a token charged and never delivered,
    pending at an abort or a stop, is given back).
"""

from __future__ import annotations

import random

import pytest

from server.engine.kv_cache import BlockAllocator
from server.engine.policies import VTCPolicy
from server.engine.request import FinishReason, GenerationRequest, SamplingParams, Sequence
from server.engine.scheduler import Scheduler

W_P, W_Q = 1.0, 2.0


def run(seed: int, tenants: str) -> tuple[VTCPolicy, float, int]:
    """-> the policy, the counter one tenant must have, the preemptions seen."""
    rng = random.Random(seed)
    num_blocks, block_size = rng.randint(4, 30), rng.choice([1, 2, 4])
    allocator = BlockAllocator(num_blocks, block_size, prefix_caching=rng.random() < 0.5)
    policy = VTCPolicy(W_P, W_Q)
    sched = Scheduler(allocator, rng.randint(1, 6), rng.randint(1, 40), max_loras=rng.randint(1, 3),
                      policy=policy, max_wait_steps=rng.randint(1, 8))
    capacity = num_blocks * block_size  # what --max-model-len is capped to: one request always fits alone
    live: list[Sequence] = []
    in_flight: list[Sequence] = []  # sampled by the step launched last, tokens not taken in yet
    prompt_done: dict[str, int] = {}
    delivered = preemptions = added = idle = prompt_computed = 0
    for _ in range(5000):
        if added < 40 and rng.random() < 0.3:
            prompt = rng.randint(1, capacity - 1)
            params = SamplingParams(max_tokens=rng.randint(1, min(8, capacity - prompt)), ignore_eos=True)
            # few distinct prompts: prefix-cache hits and same-step sharing
            req = GenerationRequest(f"r{added}", [rng.randrange(2)] * prompt, params,
                                    adapter=rng.choice([None, "x", "y", "z"]), tenant=rng.choice(tenants))
            added += 1
            s = Sequence.from_request(req)
            sched.add(s)
            live.append(s)
        out = sched.schedule()
        preemptions += len(out.preempted)
        sampled = [c.seq for c in out.chunks if c.samples]
        for c in out.chunks:  # launched
            end = min(c.start + c.num_tokens, c.seq.num_prompt_tokens)
            done = max(prompt_done.get(c.seq.request_id, 0), c.start)  # before `start`: a cache hit
            if end > done:
                prompt_computed += end - done
                prompt_done[c.seq.request_id] = end
            c.seq.num_computed_tokens += c.num_tokens
            allocator.cache_computed(c.seq)
        for s in sampled:
            s.num_pending += 1
        for s in in_flight:  # the step before, taken in
            s.num_pending -= 1
            if s.is_finished:
                continue
            s.token_ids.append(rng.randrange(2))
            delivered += 1
            if s.num_output_tokens >= s.params.max_tokens or rng.random() < 0.1:
                sched.finish(s, FinishReason.STOP)
                live.remove(s)
        if live and rng.random() < 0.05:
            s = rng.choice(live)
            sched.finish(s, FinishReason.ABORT)
            live.remove(s)
        in_flight = sampled
        idle = idle + 1 if out.is_empty and sched.has_work() else 0
        assert idle < 30, "work left and nothing scheduled"
        active: dict[str, int] = {}
        for s in [*sched.waiting, *sched.running]:
            active[s.request.tenant] = active.get(s.request.tenant, 0) + 1
        assert policy._active == active
        if added == 40 and not sched.has_work():
            break
    assert not sched.has_work() and allocator.num_used == 0
    return policy, W_P * prompt_computed + W_Q * delivered, preemptions


@pytest.mark.parametrize("seed", range(40))
def test_one_tenant_pays_exactly_what_it_got_and_all_work_ends(seed):
    policy, expected, _ = run(seed, "a")
    assert policy.counters().get("a", 0.0) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(40))
def test_several_tenants_all_work_ends_and_counters_stay_non_negative(seed):
    policy, _, _ = run(seed, "abc")
    assert all(c >= 0 for c in policy.counters().values())


def test_the_workloads_preempt():
    assert sum(run(seed, "ab")[2] for seed in range(10)) > 50
