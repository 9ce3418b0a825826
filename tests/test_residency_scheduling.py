"""Residency-aware scheduling on the real Scheduler and BlockAllocator with a fake residency
(loads take `load_steps` steps; a count-bounded LRU that evicts only what the scheduler does not
keep, as HostAdapterCache does). Pure Python, no model.

The starvation bound tested (server/engine/scheduler.py): a waiting sequence whose adapter is
resident is admitted within max_wait_steps + S steps of being first passed over, S the most steps
a running sequence still needs (here: 1 prefill chunk + max_tokens - 1 decodes), plus its load.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from test_scheduling_policy import W_P, W_Q, Sim, seq

from server.engine.policies import FCFSPolicy, VTCPolicy
from server.engine.residency import AdapterState


class FakeResidency:
    def __init__(self, capacity: int, load_steps: int = 2, resident=()):
        self.capacity = capacity
        self.load_steps = load_steps
        self.resident: OrderedDict[str, bool] = OrderedDict((r, True) for r in resident)  # ref -> used since load
        self.loading: dict[str, int] = {}  # ref -> steps left
        self.prefetched: list[list[str]] = []
        self.loads = 0
        self.wasted = 0  # loads evicted before any request used them

    def state_of(self, ref):
        if ref in self.resident:
            return AdapterState.RESIDENT
        return AdapterState.LOADING if ref in self.loading else AdapterState.COLD

    def prefetch(self, refs, keep):
        self.prefetched.append(list(refs))
        room = self.capacity - len(self.loading) - sum(1 for r in keep if r in self.resident)
        for ref in refs:
            if ref in self.resident or ref in self.loading:
                continue
            if room <= 0 and self.loading:
                break
            self.loading[ref] = self.load_steps
            self.loads += 1
            room -= 1

    def tick(self, keep: set[str]) -> None:
        """What the engine's poll does before each schedule: finish loads, evict LRU over budget."""
        for ref in list(self.loading):
            self.loading[ref] -= 1
            if self.loading[ref] <= 0:
                del self.loading[ref]
                self.resident[ref] = False
        for ref in list(self.resident):
            if len(self.resident) <= self.capacity:
                break
            if ref not in keep:
                self.wasted += not self.resident.pop(ref)

    def used(self, ref: str) -> None:
        self.resident[ref] = True
        self.resident.move_to_end(ref)


class ResidencySim(Sim):
    def __init__(self, policy, residency: FakeResidency, **kw):
        super().__init__(policy, **kw)
        self.res = residency
        self.sched.residency = residency
        self.sched.adapter_ready = lambda ref: residency.state_of(ref) is AdapterState.RESIDENT
        self.admitted: list[str] = []

    def step(self):
        self.res.tick(self.sched.adapters_in_use())
        out = super().step()
        for c in out.chunks:
            if c.seq.adapter is not None:
                self.res.used(c.seq.adapter)
            if c.start == 0:
                self.admitted.append(c.seq.request_id)
        for s in self.sched.running:  # never evicted while a running request uses it
            assert s.adapter is None or s.adapter in self.res.resident, s.adapter
        return out


def test_prefetch_names_the_next_window_in_fcfs_order():
    res = FakeResidency(capacity=8, load_steps=3)
    sim = ResidencySim(FCFSPolicy(), res, max_num_seqs=8, max_loras=8)
    sim.sched.prefetch_window = 3
    sim.add(*(seq(f"r{i}", "t", 4, adapter=a) for i, a in enumerate("aabcde")))
    sim.step()
    assert res.prefetched[0] == ["a", "b"]  # the first 3 sequences' adapters, distinct, in order
    assert set(res.loading) == {"a", "b"}  # c, d and e not loaded ahead of their turn
    assert sim.sched.running == []  # nothing resident yet: nothing admitted, nothing blocked


def test_vtc_prefetch_order_interleaves_tenants_lowest_counter_first():
    policy = VTCPolicy(W_P, W_Q)
    res = FakeResidency(capacity=8, load_steps=5)
    sim = ResidencySim(policy, res, max_num_seqs=8, max_loras=8)
    sim.sched.prefetch_window = 3
    sim.add(seq("x1", "hi", 4, adapter="x1"), seq("x2", "hi", 4, adapter="x2"),
            seq("y1", "lo", 4, adapter="y1"), seq("y2", "lo", 4, adapter="y2"))
    policy.counter.update({"hi": 100.0, "lo": 0.0})
    sim.step()
    assert res.prefetched[0] == ["y1", "x1", "y2"]


def test_loaded_adapters_are_admitted_and_a_loading_one_blocks_nobody():
    res = FakeResidency(capacity=8, load_steps=2, resident=["hot"])
    sim = ResidencySim(FCFSPolicy(), res, max_num_seqs=8, max_loras=8)
    sim.add(seq("c0", "t", 4, adapter="cold"), seq("h0", "t", 4, adapter="hot"), seq("b0", "t", 4))
    sim.step()
    assert sim.admitted == ["h0", "b0"]
    sim.step()
    sim.step()  # the load took 2 steps
    assert "c0" in sim.admitted


@pytest.mark.parametrize("policy_name", ["fcfs", "vtc"])
def test_a_cold_adapter_is_not_starved_by_hot_ones_that_keep_arriving(policy_name):
    """max_loras = 2 held by hot adapters h1/h2 that get a new request every step (admitted at
    once, so the running set never empties and never frees an adapter place): without the bound, cold adapter c's request would never fit the adapter budget (checked below with the
    bound off). With it: admitted within max_wait_steps + S + load steps."""

    def run(max_wait_steps: int, steps: int) -> int | None:
        policy = FCFSPolicy() if policy_name == "fcfs" else VTCPolicy(W_P, W_Q)
        res = FakeResidency(capacity=8, load_steps=2, resident=["h1", "h2"])
        sim = ResidencySim(policy, res, max_num_seqs=64, max_loras=2, max_num_batched_tokens=64)
        sim.sched.max_wait_steps = max_wait_steps
        for i in range(4):
            sim.add(seq(f"h1-{i}", "a", 4, adapter="h1"), seq(f"h2-{i}", "b", 4, adapter="h2"))
        sim.step()
        sim.add(seq("cold", "c", 4, max_tokens=4, adapter="c"))
        for t in range(steps):
            sim.add(seq(f"h1-n{t}", "a", 4, adapter="h1"), seq(f"h2-n{t}", "b", 4, adapter="h2"))
            sim.step()
            if "cold" in sim.admitted:
                return t + 1
        return None

    n, max_tokens, load = 8, 4, 2
    s = 1 + (max_tokens - 1)  # a running request's remaining steps at most: its prefill + decodes
    waited = run(n, 200)
    assert waited is not None and waited <= load + n + s + 1, waited
    assert run(10**9, 200) is None  # the bound is what admits it: without it, starved for good


def test_working_set_larger_than_the_cache_does_not_thrash():
    """12 adapters cycled round robin through a 4-adapter cache: no load is evicted before a
    request used it, running requests keep theirs (ResidencySim asserts), every request finishes."""
    res = FakeResidency(capacity=4, load_steps=2)
    sim = ResidencySim(FCFSPolicy(), res, max_num_seqs=4, max_loras=2)
    sim.sched.prefetch_window = 3
    total = 60
    sim.add(*(seq(f"r{i}", "t", 4, max_tokens=3, adapter=f"a{i % 12}") for i in range(total)))
    for _ in range(2000):
        if not sim.sched.has_work():
            break
        sim.step()
    assert len(sim.finished) == total
    assert res.wasted == 0
    assert res.loads <= total  # at most one load per request


def test_when_everything_is_resident_vtc_order_is_unchanged():
    """Affinity never reorders runnable requests: with every adapter resident, admissions follow
    plain VTC exactly (fairness first; residency only skips what cannot run yet)."""

    def admissions(with_residency: bool) -> list[str]:
        policy = VTCPolicy(W_P, W_Q)
        res = FakeResidency(capacity=16, resident=[f"x{i}" for i in range(6)])
        sim = ResidencySim(policy, res, max_num_seqs=3, max_loras=16) if with_residency else None
        if sim is None:
            sim = Sim(policy, max_num_seqs=3, max_loras=16)
            sim.admitted = []
        for i in range(24):
            sim.add(seq(f"{'abc'[i % 3]}{i}", "abc"[i % 3], 2 + i % 5, max_tokens=2 + i % 3, adapter=f"x{i % 6}"))
        order = []
        while sim.sched.has_work():
            out = sim.step()
            order += [c.seq.request_id for c in out.chunks if c.start == 0]
        return order

    assert admissions(True) == admissions(False)


def test_a_long_queue_of_cold_adapters_costs_a_bounded_scan_per_step():
    """2,000 requests on 2,000 cold adapters: a step asks the policy for at most
    prefetch_window + max_num_seqs + 2 candidates and starts at most prefetch_window loads."""
    calls = []

    class Counting(FCFSPolicy):
        def next_waiting(self, waiting, skip):
            calls.append(1)
            return super().next_waiting(waiting, skip)

    res = FakeResidency(capacity=64, load_steps=1000)
    sim = ResidencySim(Counting(), res, max_num_seqs=8, max_loras=8)
    sim.add(*(seq(f"r{i}", "t", 4, adapter=f"a{i}") for i in range(2000)))
    sim.step()
    assert len(calls) <= sim.sched.prefetch_window + 8 + 2
    assert len(res.loading) == sim.sched.prefetch_window


class PagedResidency(FakeResidency):
    """Adapters of rank-unit pages: `pages[ref]` pool pages each (1 if not named)."""

    def __init__(self, pages: dict[str, int], **kw):
        super().__init__(**kw)
        self.pages = pages

    def pages_of(self, ref):
        return self.pages.get(ref, 1)


def paged_sim(res: PagedResidency, max_lora_pages: int, **kw) -> ResidencySim:
    sim = ResidencySim(FCFSPolicy(), res, **kw)
    sim.sched.max_lora_pages = max_lora_pages
    return sim


def step_pages(res: PagedResidency, out) -> int:
    return sum(res.pages_of(a) for a in {c.seq.adapter for c in out.chunks} if a is not None)


def test_a_step_takes_adapters_by_their_pages():
    """6 pages: small adapters (1 page) fill a step far past what rank-16 ones (4 pages) would; no
    step's adapters ever take more than the pool's pages."""
    small = [f"s{i}" for i in range(8)]
    res = PagedResidency({"b1": 4, "b2": 4}, capacity=16, resident=[*small, "b1", "b2"])
    sim = paged_sim(res, 6, max_num_seqs=16, max_loras=16)
    sim.add(*(seq(f"r-{a}", "t", 4, adapter=a) for a in ["b1", "b2", *small]))
    widest = 0
    while sim.sched.has_work():
        out = sim.step()
        assert step_pages(res, out) <= 6
        widest = max(widest, len({c.seq.adapter for c in out.chunks}))
    assert widest >= 6 - 4 + 1 and len(sim.finished) == 10  # b1 with two small ones, then six small ones
    assert sim.admitted.index("r-b2") > 0  # b2 waited: b1 and b2 together take 8 pages


def test_a_large_adapter_is_not_starved_by_small_ones_that_keep_arriving():
    """A rank-16 adapter (4 pages of 6) waits while small adapters keep the step's pages taken
    (each admitted at once, so the running set never frees 4 pages by itself): the overdue rule
    admits it within max_wait_steps + S steps; without the rule it starves (checked)."""

    def run(max_wait_steps: int, steps: int) -> int | None:
        res = PagedResidency({"big": 4}, capacity=16, resident=["big", *(f"s{i}" for i in range(3))])
        sim = paged_sim(res, 6, max_num_seqs=64, max_loras=64)
        sim.sched.max_wait_steps = max_wait_steps
        for i in range(3):
            sim.add(seq(f"s{i}-0", "t", 4, adapter=f"s{i}"))
        sim.step()
        sim.add(seq("big", "t", 4, adapter="big"))
        for t in range(steps):
            sim.add(*(seq(f"s{i}-{t + 1}", "t", 4, adapter=f"s{i}") for i in range(3)))
            out = sim.step()
            assert step_pages(res, out) <= 6
            if "big" in sim.admitted:
                return t + 1
        return None

    n, s = 8, 1 + (4 - 1)  # the bound's N, and a running request's most remaining steps
    waited = run(n, 200)
    assert waited is not None and waited <= n + s + 1, waited
    assert run(10**9, 200) is None
