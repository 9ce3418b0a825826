"""First come, first served: the queue order, preempting the most recently admitted."""

from __future__ import annotations

from server.engine.policies.base import SchedulingPolicy


class FCFSPolicy(SchedulingPolicy):
    """The base class's defaults are FCFS; named for `--scheduling fcfs`."""
