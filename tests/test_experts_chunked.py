"""Mixtures and routes through chunked prefill, preemption (recompute) and the prefix cache:
the same greedy tokens as PEFT's model with each request alone (tiny random Llama)."""

from __future__ import annotations

from server.engine.scheduler import Scheduler

from experts_runs import experts_engine, run_batch, warm
from test_experts_parity import NEW, TINY_ABS, assert_parity, one_thread, tiny_case  # noqa: F401

KV_BYTES = 1 << 16  # 5 blocks of 16 tokens: 24 requests of up to 35 tokens must preempt


def test_chunked_preempted_and_prefix_cached_experts_equal_peft(tiny_llama_dir, tmp_path_factory, monkeypatch):
    base_dir, dirs, batch, prompts, expected = tiny_case("llama", tiny_llama_dir, tmp_path_factory)
    preempted, hits = [], []
    schedule = Scheduler.schedule

    def counting(self, *a, **kw):
        out = schedule(self, *a, **kw)
        preempted.extend(s.request_id for s in out.preempted)
        hits.append(out.prefix_hits)
        return out

    monkeypatch.setattr(Scheduler, "schedule", counting)
    engine = experts_engine(base_dir, dirs, kv_cache_memory=KV_BYTES)
    engine.scheduler.max_num_batched_tokens = 8  # prompts of 4-23 tokens: chunked
    warm(engine, list(dirs))
    # every prompt twice: the second of each pair finds the first's blocks in the prefix cache
    jobs = [(choice, pr) for (_, choice, _), pr in zip(batch, prompts)]
    tokens, logprobs, _ = run_batch(engine, jobs + jobs, NEW)
    labels = [label for label, _, _ in batch]
    assert_parity(labels * 2, tokens, logprobs, expected * 2, TINY_ABS)
    assert preempted and sum(hits)  # the run did preempt, and did reuse cached blocks

