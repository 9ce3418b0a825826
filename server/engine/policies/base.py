"""The interface between the scheduler and a scheduling policy."""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterable

from server.engine.request import Sequence


class SchedulingPolicy:
    """Orders admission and preemption; the default hooks do nothing (first come, first served).

    The scheduler calls, on the engine thread:
      `on_add` when a request is queued, `on_finish` when it leaves for good,
      `next_waiting` for each admission, `preemption_victim` when the KV cache is full,
      `on_scheduled` for each chunk it schedules (the tokens that step computes),
      `prefetch_order` once a step, to choose whose adapters to load ahead.
    """

    def on_add(self, seq: Sequence) -> None:
        pass

    def on_finish(self, seq: Sequence) -> None:
        pass

    def next_waiting(self, waiting: Iterable[Sequence], skip: Container[int]) -> Sequence | None:
        """The waiting sequence to admit next, ignoring those whose `id()` is in `skip` (they cannot
        run this step); None if none is left. `waiting` is in queue order (preempted ones first)."""
        return next((s for s in waiting if id(s) not in skip), None)

    def prefetch_order(self, waiting: Iterable[Sequence], k: int) -> list[Sequence]:
        """The (at most) `k` waiting sequences this policy would admit next, best guess, in order:
        whose adapters to load ahead of admission. Default: queue order."""
        return list(itertools.islice(waiting, k))

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        """Which of `candidates` (running, in admission order, never empty) to preempt."""
        return candidates[-1]  # the most recently admitted: it has the least work to redo

    def on_scheduled(self, seq: Sequence, start: int, num_tokens: int, samples: bool) -> None:
        """`seq`'s tokens [start, start + num_tokens) are computed this step; `samples`: and it
        yields one new output token."""

    def set_weights(self, weights: dict[str, float]) -> None:
        pass

    def counters(self) -> dict[str, float]:
        """Per-tenant counters to publish (none for policies without)."""
        return {}
