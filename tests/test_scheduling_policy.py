"""Scheduling policies on the real Scheduler and BlockAllocator, with a tiny simulated engine
(each scheduled chunk is computed; a sampling chunk appends one token; a sequence finishes at
max_tokens). Pure Python, no model.

The VTC bound tested (Sheng et al., OSDI 2024, Theorem 4.4, weighted form): while tenants f
and g are both backlogged, for every interval [t1, t2]
    |W_f(t1, t2) / weight_f - W_g(t1, t2) / weight_g| <= 2 * U,
    W = w_p * prompt tokens computed + w_q * output tokens generated,
    U = max(w_p * L_input, w_q * M) / min(weight),
with L_input the longest prompt and M the most tokens the running batch can hold.
"""

from __future__ import annotations

import random

import pytest

from server.engine.kv_cache import BlockAllocator
from server.engine.policies import FCFSPolicy, SchedulingPolicy, VTCPolicy
from server.engine.request import FinishReason, GenerationRequest, SamplingParams, Sequence, SeqStatus
from server.engine.scheduler import Scheduler, SchedulerOutput

W_P, W_Q = 1.0, 2.0


def seq(rid: str, tenant: str, prompt: int, max_tokens: int = 4, adapter: str | None = None) -> Sequence:
    req = GenerationRequest(rid, [7] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                            adapter=adapter, tenant=tenant)
    return Sequence.from_request(req)


class Sim:
    """A Scheduler driven as the engine drives it, measuring each tenant's weighted service."""

    def __init__(self, policy: SchedulingPolicy, num_blocks: int = 1000, block_size: int = 4, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 64, max_loras: int = 0, adapter_ready=None):
        self.policy = policy
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.sched = Scheduler(self.allocator, max_num_seqs, max_num_batched_tokens, max_loras=max_loras,
                               adapter_ready=adapter_ready, policy=policy)
        self.service: dict[str, float] = {}  # first-time prompt tokens * W_P + output tokens * W_Q
        self.finished: list[Sequence] = []
        self._prompt_done: dict[str, int] = {}

    def add(self, *seqs: Sequence) -> None:
        for s in seqs:
            self.sched.add(s)

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        for c in out.chunks:
            s = c.seq
            end = min(c.start + c.num_tokens, s.num_prompt_tokens)
            new_prompt = max(0, end - self._prompt_done.get(s.request_id, 0))
            self._prompt_done[s.request_id] = max(end, self._prompt_done.get(s.request_id, 0))
            t = s.request.tenant
            self.service[t] = self.service.get(t, 0.0) + W_P * new_prompt + (W_Q if c.samples else 0.0)
            s.num_computed_tokens += c.num_tokens
            if c.samples:
                s.token_ids.append(9)
                if s.num_output_tokens >= s.params.max_tokens:
                    self.sched.finish(s, FinishReason.LENGTH)
                    self.finished.append(s)
        return out

    def ids(self, seqs) -> list[str]:
        return [s.request_id for s in seqs]


def test_fcfs_admits_in_arrival_order_whoever_the_tenant():
    sim = Sim(FCFSPolicy(), max_num_seqs=2)
    sim.add(seq("a1", "a", 4), seq("a2", "a", 4), seq("b1", "b", 4))
    sim.step()
    assert sim.ids(sim.sched.running) == ["a1", "a2"]


def test_vtc_admits_the_tenant_with_the_lowest_counter_first_in_first_out_within_it():
    sim = Sim(VTCPolicy(W_P, W_Q), max_num_seqs=4)
    sim.add(*(seq(f"a{i}", "a", 4) for i in range(6)), seq("b0", "b", 4), seq("b1", "b", 4))
    sim.step()
    # a0 (tie at 0: earlier head), then b0 (a is ahead by 4 + 2), then a1 (a: 6, b: 6, a's head is earlier),
    # then b1.
    assert sim.ids(sim.sched.running) == ["a0", "b0", "a1", "b1"]
    assert sim.policy.counters() == {"a": 12.0, "b": 12.0}


def test_a_tenant_returning_from_idle_is_lifted_to_the_lowest_active_counter():
    policy = VTCPolicy(W_P, W_Q)
    sim = Sim(policy, max_num_seqs=2)
    sim.add(seq("a0", "a", 8, max_tokens=30), seq("a1", "a", 8, max_tokens=30))
    for _ in range(10):
        sim.step()
    a_counter = policy.counter["a"]
    assert a_counter == 2 * (8 + 10 * 2)
    sim.add(seq("b0", "b", 4))  # b was never seen: it does not start at 0, 56 tokens "behind"
    assert policy.counter["b"] == a_counter
    # A tenant already above the lowest active counter keeps its own.
    policy.counter["c"] = a_counter + 100
    sim.add(seq("c0", "c", 4))
    assert policy.counter["c"] == a_counter + 100
    # With nobody active, the newcomer starts at the counter of the last tenant to leave.
    while sim.sched.has_work():
        sim.step()
    last = policy.counter[sim.finished[-1].request.tenant]
    sim.add(seq("d0", "d", 4))
    assert policy.counter["d"] == last > 0


def test_without_the_lift_idle_time_is_banked():
    """The same arrival with the lift switched off lets the newcomer run alone until it catches up:
    the lift is what the test above observes, not an accident of the workload."""

    class NoLift(VTCPolicy):
        def on_add(self, s):
            self._active[s.request.tenant] = self._active.get(s.request.tenant, 0) + 1

    def b_share(policy):
        sim = Sim(policy, max_num_seqs=2)
        for i in range(20):
            sim.add(seq(f"a{i}", "a", 8, max_tokens=8))
        for _ in range(40):
            sim.step()
        sim.service.clear()
        for i in range(20):
            sim.add(seq(f"b{i}", "b", 8, max_tokens=8))
        for _ in range(40):
            sim.step()
        return sim.service.get("b", 0) / sum(sim.service.values())

    assert b_share(NoLift(W_P, W_Q)) > 0.9  # b ran alone, spending a's past service
    assert 0.35 < b_share(VTCPolicy(W_P, W_Q)) < 0.65  # b gets its half from the moment it arrives


def _preemption_scenario(policy: SchedulingPolicy) -> tuple[Sim, list[Sequence], dict[str, float]]:
    """a runs two sequences; b arrives two steps later; the KV cache fills up while a is ahead.
    Returns the sim, the first step's preempted sequences and the counters before that step."""
    sim = Sim(policy, num_blocks=6, block_size=4, max_num_seqs=4)
    sim.add(seq("a0", "a", 2, max_tokens=30), seq("a1", "a", 2, max_tokens=30))
    sim.step()
    sim.step()
    sim.add(seq("b0", "b", 2, max_tokens=30))
    preempted: list[Sequence] = []
    for _ in range(20):
        counters = dict(policy.counters())
        out = sim.step()
        if out.preempted:
            preempted = out.preempted
            break
    return sim, preempted, counters


def test_vtc_preempts_from_the_tenant_furthest_ahead_most_recent_first():
    sim, preempted, counters = _preemption_scenario(VTCPolicy(W_P, W_Q))
    assert preempted, "the scenario must fill the KV cache"
    assert counters["a"] > counters["b"]
    assert sim.ids(preempted) == ["a1"]  # a's most recent, although b0 was admitted after it
    # FCFS on the same scenario preempts the most recent admission, b0: the test discriminates.
    _, fcfs_preempted, _ = _preemption_scenario(FCFSPolicy())
    assert sim.ids(fcfs_preempted) == ["b0"]


def test_victim_choice_on_counters():
    policy = VTCPolicy(W_P, W_Q)
    policy.counter.update({"a": 5.0, "b": 9.0, "c": 1.0})
    cands = [seq("b0", "b", 1), seq("a0", "a", 1), seq("b1", "b", 1), seq("c0", "c", 1)]
    assert policy.preemption_victim(cands).request_id == "b1"


def test_an_adapter_that_cannot_run_this_step_does_not_block_its_tenant_or_others():
    """max_loras = 1 and y is in use: a's head (adapter x) is skipped; b's base-model request and
    a's own next request are admitted in the same step; x's request keeps its place and runs first
    once the adapter budget frees."""
    policy = VTCPolicy(W_P, W_Q)
    sim = Sim(policy, max_num_seqs=8, max_loras=1)
    sim.add(seq("y0", "c", 4, max_tokens=3, adapter="y"))
    sim.step()
    policy.counter.update({"a": 0.0, "b": 50.0})  # a is furthest behind: its head is first in line
    sim.add(seq("a_x", "a", 4, adapter="x"), seq("a_base", "a", 4), seq("b_base", "b", 4),
            seq("a_x2", "a", 4, adapter="x"))
    sim.step()
    assert sim.ids(sim.sched.running) == ["y0", "a_base", "b_base"]
    assert sim.ids(sim.sched.waiting) == ["a_x", "a_x2"]  # kept in order, nothing charged for them
    sim.step()  # y0 finishes (3 tokens): the slot is free
    sim.step()
    assert sim.ids(sim.sched.running)[-2:] == ["a_x", "a_x2"]


def test_an_adapter_not_yet_loaded_is_skipped_without_charge():
    loaded: set[str] = set()
    policy = VTCPolicy(W_P, W_Q)
    sim = Sim(policy, max_num_seqs=8, max_loras=4, adapter_ready=lambda name: name in loaded)
    sim.add(seq("a_x", "a", 4, adapter="x"), seq("b0", "b", 4))
    sim.step()
    assert sim.ids(sim.sched.running) == ["b0"]
    assert policy.counters()["a"] == 0.0
    loaded.add("x")
    sim.step()
    assert "a_x" in sim.ids(sim.sched.running)


def test_chunked_prefill_is_charged_per_chunk_and_a_recompute_is_not_charged_again():
    policy = VTCPolicy(W_P, W_Q)
    sim = Sim(policy, max_num_batched_tokens=8)
    s = seq("a0", "a", 20, max_tokens=5)
    sim.add(s)
    seen = []
    for _ in range(4):
        sim.step()
        seen.append(policy.counter["a"])
    assert seen == [8.0, 16.0, 20.0 + W_Q, 20.0 + 2 * W_Q]  # 8 + 8 + 4 prompt tokens, then decodes
    # Preempted now, it recomputes 21 tokens (prompt + 1 output) in chunks: only new output is charged.
    out = SchedulerOutput()
    sim.sched._preempt(s, out)
    for _ in range(3):
        sim.step()
    assert s.num_computed_tokens == 22 and policy.counter["a"] == 20.0 + 3 * W_Q


def test_weights_scale_the_counters_and_unknown_tenants_weigh_one():
    policy = VTCPolicy(W_P, W_Q)
    policy.set_weights({"a": 2.0})
    sim = Sim(policy, max_num_seqs=4)
    sim.add(seq("a0", "a", 8), seq("z0", "z", 8))
    sim.step()
    assert policy.counters() == {"a": (8 + W_Q) / 2.0, "z": 8 + W_Q}
    with pytest.raises(ValueError):
        policy.set_weights({"a": 0.0})


def test_tokens_cut_after_a_weight_change_give_back_what_each_was_charged():
    # --engine-process on: several last tokens may be cut (a stop string found in the server
    # process), and a reload may have changed the tenant's weight between their charges. Giving
    # them all back at the last token's price once drove the counter negative (-8.0 here).
    policy = VTCPolicy(W_P, W_Q)
    sim = Sim(policy)
    s = seq("a0", "a", 4, max_tokens=20)
    sim.add(s)
    for _ in range(6):  # the prompt, then 6 output tokens at weight 1: 2.0 each
        sim.step()
    policy.set_weights({"a": 0.25})
    sim.step()  # a 7th at weight 0.25: 8.0
    assert s.num_output_tokens == 7 and policy.counter["a"] == 4 * W_P + 6 * W_Q + W_Q / 0.25
    s.num_cut = 4  # the client got 3: 3 cut tokens were charged 2.0, the last 8.0
    sim.sched.finish(s, FinishReason.ABORT)
    assert policy.counter["a"] == 4 * W_P + 3 * W_Q


def _backlogged_run(policy: SchedulingPolicy, weights: dict[str, float], steps: int, seed: int):
    """a keeps 10x b's requests outstanding (both always have some waiting); random prompt and
    output lengths. Returns the time series of D(t) = W_a(t)/weight_a - W_b(t)/weight_b and U."""
    rng = random.Random(seed)
    l_input, max_out, max_num_seqs = 24, 16, 4
    sim = Sim(policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=32)
    outstanding = {"a": 80, "b": 8}  # b holds at most 4 of them running: b stays backlogged
    n = 0

    def submit(tenant):
        nonlocal n
        n += 1
        sim.add(seq(f"{tenant}{n}", tenant, rng.randint(1, l_input), rng.randint(1, max_out)))

    for tenant, k in outstanding.items():
        for _ in range(k):
            submit(tenant)
    series = []
    for _ in range(steps):
        done = len(sim.finished)
        sim.step()
        for s in sim.finished[done:]:
            submit(s.request.tenant)  # closed loop: the load stays as offered
        assert {s.request.tenant for s in sim.sched.waiting} == {"a", "b"}  # both backlogged throughout
        series.append(sim.service.get("a", 0) / weights.get("a", 1) - sim.service.get("b", 0) / weights.get("b", 1))
    m = min(sim.allocator.num_blocks * sim.allocator.block_size, max_num_seqs * (l_input + max_out))
    u = max(W_P * l_input, W_Q * m) / min(weights.get(t, 1.0) for t in ("a", "b"))
    return series, u, sim


@pytest.mark.parametrize("weights", [{}, {"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 1.0}])
@pytest.mark.parametrize("seed", [0, 1])
def test_vtc_service_difference_between_backlogged_tenants_is_bounded(weights, seed):
    policy = VTCPolicy(W_P, W_Q)
    policy.set_weights(weights)
    series, u, sim = _backlogged_run(policy, weights, steps=1500, seed=seed)
    # Every interval [t1, t2]: |D(t2) - D(t1)| <= 2U, i.e. the range of D is at most 2U.
    assert max(series) - min(series) <= 2 * u, (max(series), min(series), u)
    assert sum(sim.service.values()) > 20 * 2 * u  # long enough for the bound to mean something


def test_fcfs_breaks_that_bound_on_the_same_workload():
    series, u, _ = _backlogged_run(FCFSPolicy(), {}, steps=1500, seed=0)
    assert max(series) - min(series) > 5 * 2 * u  # a's 10x load takes ~10/11 of the service


def test_the_default_policy_is_vtc_exactly_when_tenants_are_configured():
    from server.cli import build_config, make_parser
    from server.engine.policies import make_policy, policy_name

    def cfg(*args):
        return build_config(make_parser().parse_args(["serve", *args]))

    assert policy_name(cfg()) == "fcfs"
    assert policy_name(cfg("--tenants", "t.toml")) == "vtc"
    assert policy_name(cfg("--api-keys", "k=acme")) == "vtc"
    assert policy_name(cfg("--api-keys", "k=acme", "--scheduling", "fcfs")) == "fcfs"
    vtc = make_policy(cfg("--scheduling", "VTC", "--vtc-input-weight", "0.5", "--vtc-output-weight", "3"))
    assert isinstance(vtc, VTCPolicy) and (vtc.input_weight, vtc.output_weight) == (0.5, 3.0)
    for bad in (["--scheduling", "lottery"], ["--vtc-output-weight", "-1"]):
        with pytest.raises(ValueError):
            cfg(*bad)


def test_adapters_by_status_follow_every_change_of_status():
    """The running / waiting adapter sets the gauges name are kept incrementally: after any mix of
    arrivals, admissions, preemptions (a KV cache too small for the load), finishes and aborts
    they equal the sets recomputed from the queues, and `adapters_version` moves when they change."""
    rng = random.Random(3)
    sim = Sim(FCFSPolicy(), num_blocks=10, block_size=4, max_num_seqs=4, max_loras=8)
    sched = sim.sched
    seen = (set(), set(), sched.adapters_version)
    preemptions = 0
    for i in range(400):
        if rng.random() < 0.5:
            sim.add(seq(f"r{i}", "t", rng.randint(1, 6), rng.randint(2, 26), rng.choice([None, "a", "b", "c", "d"])))
        elif rng.random() < 0.15 and (sched.waiting or sched.running):
            sched.finish(rng.choice([*sched.waiting, *sched.running]), FinishReason.ABORT)
        else:
            preemptions += len(sim.step().preempted)
        running = {a for s in sched.running for a in s.adapters}
        waiting = {a for s in sched.waiting for a in s.adapters}
        assert set(sched.adapters_of(SeqStatus.RUNNING)) == running
        assert set(sched.adapters_of(SeqStatus.WAITING)) == waiting
        if (running, waiting) != seen[:2]:
            assert sched.adapters_version != seen[2]
        seen = (running, waiting, sched.adapters_version)
    assert preemptions > 0, "the test meant to cover preemptions"


def test_a_first_chunk_needing_every_block_is_admitted_when_nothing_runs():
    """A prompt that fits the cache only whole (every block), with a token budget that takes it in
    one chunk: the admission watermark keeps blocks back for running sequences to grow, so with
    none running it must not apply (it did: the request waited forever, and fcfs everyone behind it)."""
    alloc = BlockAllocator(8, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64)
    assert sched.watermark == 1
    big = Sequence.from_request(GenerationRequest("big", list(range(2, 32)), SamplingParams(max_tokens=2)))
    small = Sequence.from_request(GenerationRequest("small", [5, 6], SamplingParams(max_tokens=2)))
    sched.add(big)
    sched.add(small)
    chunk, = sched.schedule().chunks
    assert chunk.seq is big and chunk.num_tokens == 30 and alloc.num_free == 0
