"""Virtual token counter (VTC) fair scheduling, after Sheng et al., "Fairness in Serving Large
Language Models" (OSDI 2024).

Each tenant has a counter of the service it received, in virtual tokens:
    counter += (w_p * prompt tokens computed + w_q * output tokens generated) / tenant weight
charged per scheduled chunk, so a chunked prefill is paid chunk by chunk, as computed. Tokens
recomputed after a preemption are not charged again: the server chose to redo them; nor are
those a prefix-cache hit holds (server/engine/kv_cache.py): a chunk's tokens before its start
are not computed. An output token is charged when the step that samples it is scheduled, and
given back if the request ends before receiving it: with async scheduling the next step is
scheduled before the host sees a token end the request (EOS, a stop token), and an abort may
come while a step holds its token (`Sequence.num_pending` at the end); with the engine in its own
process, the server process finds a stop string after the core made more tokens, which it cuts
(`Sequence.num_cut`); so a request pays for the output tokens delivered to it, in both modes
alike, the engine in its process or not.
  - Admission: the waiting tenant with the lowest counter goes next, FIFO within the tenant.
  - A tenant that returns from idle (nothing waiting or running) is lifted to the lowest
    counter among active tenants (to the last tenant to leave when none is active), so
    idle time cannot be banked and spent later as a burst.
  - Preemption (KV cache full) takes from the tenant furthest ahead, most recent first.
Bound (the paper's Theorem 4.4): over any interval in which tenants f and g are both
backlogged, |W_f / weight_f - W_g / weight_g| <= 2 * U, with W the weighted service above and
U = max(w_p * L_input, w_q * M) / min weight (L_input: longest prompt; M: the most tokens the
running batch holds).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable

from server.engine.policies.base import SchedulingPolicy
from server.engine.request import Sequence


class VTCPolicy(SchedulingPolicy):
    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0):
        for name, w in (("input", input_weight), ("output", output_weight)):
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"VTC {name} token weight must be a finite number >= 0, got {w!r}")
        self.input_weight = input_weight  # w_p
        self.output_weight = output_weight  # w_q
        self.weights: dict[str, float] = {}  # tenant -> fair-share weight; absent: 1
        self.counter: dict[str, float] = {}  # tenant -> virtual tokens served
        self._active: dict[str, int] = {}  # tenant -> sequences waiting or running
        self._last_left = 0.0  # counter of the last tenant to go idle
        self._prompt_charged: dict[str, int] = {}  # request id -> prompt tokens already charged
        # request id -> what its output tokens were charged, as runs [counter units a token, tokens]
        # in order: the weight then (a reload may change it mid-request, and giving back the last
        # tokens, pending or cut, must undo what they were charged); a new run per weight change
        self._output_charge: dict[str, list[list[float]]] = {}

    # --- arrivals and departures ---------------------------------------------------------
    def on_add(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        if not self._active.get(tenant):
            others = [self.counter.get(t, 0.0) for t in self._active if t != tenant]
            floor = min(others) if others else self._last_left
            self.counter[tenant] = max(self.counter.get(tenant, 0.0), floor)
        self._active[tenant] = self._active.get(tenant, 0) + 1

    def on_finish(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        self._prompt_charged.pop(seq.request_id, None)
        runs = self._output_charge.pop(seq.request_id, [])
        undelivered = seq.num_pending + seq.num_cut  # charged when scheduled, never got (module docstring)
        refund = 0.0
        while undelivered and runs:  # the last tokens charged are the ones never delivered
            per_token, n = runs.pop()
            k = min(n, undelivered)
            refund += per_token * k
            undelivered -= k
        if refund:
            self.counter[tenant] = self.counter.get(tenant, 0.0) - refund
        left = self._active.get(tenant, 0) - 1
        if left > 0:
            self._active[tenant] = left
        else:
            self._active.pop(tenant, None)
            self._last_left = self.counter.get(tenant, 0.0)

    # --- ordering ------------------------------------------------------------------------
    def next_waiting(self, waiting: Iterable[Sequence], skip: Container[int]) -> Sequence | None:
        best: Sequence | None = None
        best_counter = math.inf
        seen: set[str] = set()
        for seq in waiting:  # queue order: the first of each tenant is its head; ties go to the earlier head
            tenant = seq.request.tenant
            if id(seq) in skip or tenant in seen:
                continue
            seen.add(tenant)
            c = self.counter.get(tenant, 0.0)
            if c < best_counter:
                best, best_counter = seq, c
            if len(seen) == len(self._active):  # every tenant's head is found: O(tenants) when all wait
                break
        return best

    def prefetch_order(self, waiting: Iterable[Sequence], k: int) -> list[Sequence]:
        """Tenants by counter, lowest first, taking one head per tenant per round: the order
        admissions would follow if each admitted request cost its tenant about the same."""
        queues: dict[str, list[Sequence]] = {}
        for seq in waiting:
            queues.setdefault(seq.request.tenant, []).append(seq)
        tenants = sorted(queues, key=lambda t: self.counter.get(t, 0.0))  # stable: earlier heads first
        order: list[Sequence] = []
        for depth in range(k):
            row = [queues[t][depth] for t in tenants if depth < len(queues[t])]
            if not row:
                break
            order += row
        return order[:k]

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        victim, top = candidates[-1], -math.inf
        for seq in candidates:  # admission order: `>=` keeps the tenant's most recent
            c = self.counter.get(seq.request.tenant, 0.0)
            if c >= top:
                victim, top = seq, c
        return victim

    # --- accounting ----------------------------------------------------------------------
    def on_scheduled(self, seq: Sequence, start: int, num_tokens: int, samples: bool) -> None:
        charged = max(self._prompt_charged.get(seq.request_id, 0), start)  # before `start`: cached
        prompt_end = min(start + num_tokens, seq.num_prompt_tokens)
        cost = 0.0
        if prompt_end > charged:
            cost += self.input_weight * (prompt_end - charged)
            self._prompt_charged[seq.request_id] = prompt_end
        if samples:
            cost += self.output_weight
        if cost:
            tenant = seq.request.tenant
            weight = self.weights.get(tenant, 1.0)
            self.counter[tenant] = self.counter.get(tenant, 0.0) + cost / weight
            if samples:
                runs = self._output_charge.setdefault(seq.request_id, [])
                per_token = self.output_weight / weight
                if runs and runs[-1][0] == per_token:
                    runs[-1][1] += 1
                else:
                    runs.append([per_token, 1])

    def set_weights(self, weights: dict[str, float]) -> None:
        """New fair-share weights (tenants absent: 1). Counters are kept (they are already per unit
        of weight); those of tenants no longer listed and idle are dropped."""
        for tenant, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"tenant {tenant!r}: weight must be a finite number > 0, got {w!r}")
        self.weights = dict(weights)
        for tenant in [t for t in self.counter if t not in weights and t not in self._active]:
            del self.counter[tenant]

    def counters(self) -> dict[str, float]:
        return dict(self.counter)
