"""Scheduling of mixture and routed requests (issue 12) on the real Scheduler and BlockAllocator
with the fake residency of test_residency_scheduling: a request over several adapters runs only
when every one is resident, counts every one against the step's distinct-adapter budget, gets all
of them prefetched together, keeps them all from eviction while it runs, and keeps the
starvation bound. Pure Python, no model."""

from __future__ import annotations

import pytest
from test_residency_scheduling import FakeResidency, ResidencySim
from test_scheduling_policy import W_P, W_Q, Sim, seq

from server.engine.policies import FCFSPolicy, VTCPolicy
from server.engine.request import GenerationRequest, Mixture, Route, SamplingParams, Sequence


def mix(rid: str, tenant: str, prompt: int, adapters: tuple[str, ...], max_tokens: int = 4) -> Sequence:
    req = GenerationRequest(rid, [7] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                            tenant=tenant, experts=Mixture(adapters, tuple(1.0 for _ in adapters)))
    return Sequence.from_request(req)


def routed(rid: str, tenant: str, prompt: int, adapters: tuple[str, ...], top_k: int = 2) -> Sequence:
    req = GenerationRequest(rid, [7] * prompt, SamplingParams(max_tokens=4, ignore_eos=True), tenant=tenant,
                            experts=Route(adapters, top_k, 1.0))
    return Sequence.from_request(req)


class ExpertsSim(ResidencySim):
    """Also checks, every step: the step's distinct adapters fit max_loras, every adapter of a
    scheduled chunk is resident, and a running sequence's adapters are never evicted."""

    def __init__(self, policy, residency, **kw):
        super().__init__(policy, residency, **kw)
        self.step_adapters: list[set[str]] = []

    def step(self):
        self.res.tick(self.sched.adapters_in_use())
        out = Sim.step(self)  # schedule, then apply the step (tokens, finished sequences)
        adapters = {a for c in out.chunks for a in c.seq.adapters}
        assert len(adapters) <= self.sched.max_loras, adapters
        assert all(a in self.res.resident for a in adapters), adapters
        self.step_adapters.append(adapters)
        for a in adapters:
            self.res.used(a)
        self.admitted += [c.seq.request_id for c in out.chunks if c.start == 0]
        for s in self.sched.running:
            assert all(a in self.res.resident for a in s.adapters), s.adapters
        return out


def test_sequence_adapters_are_its_adapter_or_its_experts():
    assert seq("a", "t", 2).adapters == ()
    assert seq("a", "t", 2, adapter="x").adapters == ("x",)
    assert mix("m", "t", 2, ("x", "y")).adapters == ("x", "y")
    assert routed("r", "t", 2, ("x", "y", "z")).adapters == ("x", "y", "z")


def test_a_mixture_waits_for_all_its_experts_and_blocks_nobody_meanwhile():
    res = FakeResidency(capacity=8, load_steps=2, resident=["a"])
    sim = ExpertsSim(FCFSPolicy(), res, max_num_seqs=8, max_loras=8)
    sim.add(mix("m", "t", 4, ("a", "b")), seq("s", "t", 4, adapter="a"), seq("base", "t", 4))
    sim.step()
    assert sim.admitted == ["s", "base"]  # b is loading: the mixture waits, the others run
    assert "b" in res.loading
    for _ in range(3):
        sim.step()
    assert "m" in sim.admitted


def test_every_expert_counts_against_the_step_adapter_budget():
    """max_loras 3: a running single (a) leaves room for a mixture of 2 (b, c) but not of 3
    (b, c, d), which runs once a's request has finished; a base request is never held back."""
    res = FakeResidency(capacity=8, resident=["a", "b", "c", "d"])
    sim = ExpertsSim(FCFSPolicy(), res, max_num_seqs=8, max_loras=3)
    sim.add(seq("s", "t", 4, max_tokens=3, adapter="a"), mix("m3", "t", 4, ("b", "c", "d")),
            mix("m2", "t", 4, ("b", "c")), seq("base", "t", 4))
    sim.step()
    assert sim.admitted == ["s", "m2", "base"]
    assert sim.step_adapters[0] == {"a", "b", "c"}
    for _ in range(10):
        sim.step()
    assert "m3" in sim.admitted
    assert sim.admitted.index("m3") > 0 and all(s.request_id != "s" for s in sim.sched.running)


def test_a_route_shares_the_step_with_singles_on_the_same_adapters():
    """Shared adapters count once: a route over (a, b) plus singles on a and b use 2 places."""
    res = FakeResidency(capacity=8, resident=["a", "b"])
    sim = ExpertsSim(FCFSPolicy(), res, max_num_seqs=8, max_loras=2)
    sim.add(routed("r", "t", 4, ("a", "b")), seq("sa", "t", 4, adapter="a"), seq("sb", "t", 4, adapter="b"))
    sim.step()
    assert sim.admitted == ["r", "sa", "sb"]


def test_prefetch_never_splits_a_mixture():
    """Window 3 (adapters): the first sequence's 4 experts are all named, then nothing more."""
    res = FakeResidency(capacity=16, load_steps=3)
    sim = ExpertsSim(FCFSPolicy(), res, max_num_seqs=8, max_loras=8)
    sim.sched.prefetch_window = 3
    sim.add(mix("m", "t", 4, ("a", "b", "c", "d")), seq("s", "t", 4, adapter="e"))
    sim.step()
    assert res.prefetched[0] == ["a", "b", "c", "d"]
    assert set(sim.sched.adapters_in_use()) == {"a", "b", "c", "d"}


def test_a_running_mixture_keeps_its_experts_in_use():
    res = FakeResidency(capacity=8, resident=["a", "b"])
    sim = ExpertsSim(FCFSPolicy(), res, max_num_seqs=8, max_loras=8)
    sim.sched.prefetch_window = 0
    sim.add(mix("m", "t", 4, ("a", "b"), max_tokens=8))
    sim.step()
    assert {"a", "b"} <= sim.sched.adapters_in_use()


@pytest.mark.parametrize("policy_name", ["fcfs", "vtc"])
def test_a_mixture_of_cold_experts_is_not_starved_by_hot_singles(policy_name):
    """max_loras 2 held by hot adapters h1/h2 with a new request every step: a mixture of two
    cold experts (c1, c2) needs both places at once. The bound admits it within
    max_wait_steps + S + its load steps; without the bound it never runs."""

    def run(max_wait_steps: int, steps: int) -> int | None:
        policy = FCFSPolicy() if policy_name == "fcfs" else VTCPolicy(W_P, W_Q)
        res = FakeResidency(capacity=8, load_steps=2, resident=["h1", "h2"])
        sim = ExpertsSim(policy, res, max_num_seqs=64, max_loras=2, max_num_batched_tokens=64)
        sim.sched.max_wait_steps = max_wait_steps
        for i in range(4):
            sim.add(seq(f"h1-{i}", "a", 4, adapter="h1"), seq(f"h2-{i}", "b", 4, adapter="h2"))
        sim.step()
        sim.add(mix("cold", "c", 4, ("c1", "c2"), max_tokens=4))
        for t in range(steps):
            sim.add(seq(f"h1-n{t}", "a", 4, adapter="h1"), seq(f"h2-n{t}", "b", 4, adapter="h2"))
            sim.step()
            if "cold" in sim.admitted:
                return t + 1
        return None

    n, max_tokens, load = 8, 4, 2
    s = 1 + (max_tokens - 1)
    waited = run(n, 200)
    assert waited is not None and waited <= load + n + s + 1, waited
    assert run(10**9, 200) is None
