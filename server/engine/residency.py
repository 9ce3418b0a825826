"""What the scheduler may know and ask about adapter weights: a small interface, no tensors, no I/O.

The engine injects an implementation (server/adapters/manager.py `AdapterManager`); the
scheduler only reads states and names the adapters it wants loaded next, in priority order.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from typing import Protocol


class AdapterState(enum.Enum):
    RESIDENT = "resident"  # in the host cache: a request for it can run this step
    LOADING = "loading"  # a load is under way
    COLD = "cold"  # on disk only


class Residency(Protocol):
    def state_of(self, ref: Hashable) -> AdapterState:
        """Where `ref`'s weights are now."""

    def pages_of(self, ref: Hashable) -> int:
        """Device pool pages `ref`'s weights take in a step (server/adapters/slots.py)."""

    def prefetch(self, refs: Sequence[Hashable], keep: set[Hashable]) -> None:
        """Start loads for the cold adapters of `refs`, most wanted first, only while they fit the
        cache without evicting any adapter of `keep` (those running or about to run)."""
