"""Scheduling policies: which waiting sequence to admit next and which running one to preempt.

The scheduler (server/engine/scheduler.py) owns the mechanics (token budget, KV blocks,
the adapter budget); a policy only orders. Both are plain Python over `Sequence`s.
"""

from __future__ import annotations

from server.config import Config
from server.engine.policies.base import SchedulingPolicy
from server.engine.policies.fcfs import FCFSPolicy
from server.engine.policies.vtc import VTCPolicy

POLICIES = ("fcfs", "vtc")


def policy_name(config: Config) -> str:
    """`--scheduling`, or by default vtc when tenants are configured (--tenants / --api-keys), else fcfs."""
    if config.scheduler.scheduling:
        return config.scheduler.scheduling
    return "vtc" if config.server.tenants or config.server.api_keys else "fcfs"


def make_policy(config: Config) -> SchedulingPolicy:
    name = policy_name(config)
    if name == "fcfs":
        return FCFSPolicy()
    if name == "vtc":
        sc = config.scheduler
        return VTCPolicy(input_weight=sc.vtc_input_weight, output_weight=sc.vtc_output_weight)
    raise ValueError(f"unknown scheduling policy {name!r}: use one of {', '.join(POLICIES)}")


__all__ = ["POLICIES", "FCFSPolicy", "SchedulingPolicy", "VTCPolicy", "make_policy", "policy_name"]
