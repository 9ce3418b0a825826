"""Per-tenant quotas: token buckets (requests and tokens per minute), a concurrency bound and
a bounded admission queue. Pure Python on one asyncio loop; the clock is injectable so the
policy is tested without sleeping.

One HTTP request = one `Lease`, taken by `Quotas.admit` and holding:
- 1 from the tenant's requests bucket;
- for each of its generations (prompts x n), `prompt + max_tokens` from its tokens bucket,
  settled when that generation ends (what it did not generate is given back);
- one concurrency slot per generation, freed when that generation ends.
A request over `max_concurrent` waits in the tenant's FIFO admission queue if it has fewer
than `max_queued` waiters, else it is refused at once. Refusals raise `QuotaExceeded`, which
says how long until the same request could pass (the HTTP layer turns it into a 429).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.tenants.table import Tenant, TenantLimits, TenantTable

Clock = Callable[[], float]
WINDOW_S = 60.0  # the limits are per minute; a full bucket allows a minute's worth at once


class TokenBucket:
    """`per_minute` units a minute, refilled continuously; it holds a minute's worth, or
    `min_capacity` if more (a request limit under one a minute must still let one through).
    Units are taken only when all are there; refunds never overfill the bucket."""

    def __init__(self, per_minute: float, clock: Clock, level: float | None = None, min_capacity: float = 0.0):
        self.capacity = max(float(per_minute), min_capacity)
        self.rate = per_minute / WINDOW_S  # units per second
        self._clock = clock
        self._level = self.capacity if level is None else min(level, self.capacity)
        self._at = clock()

    @property
    def level(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are there (0: now); inf if it can never fit."""
        if amount > self.capacity:
            return math.inf
        missing = amount - self.level
        return max(0.0, missing / self.rate) if missing > 0 else 0.0

    def take(self, amount: float) -> None:
        self._level = self.level - amount

    def give(self, amount: float) -> None:
        self._level = min(self.capacity, self.level + amount)

    def time_to_full(self) -> float:
        return 0.0 if self.rate <= 0 else (self.capacity - self.level) / self.rate


class QuotaExceeded(Exception):
    """A tenant's limit refuses this request. `retry_after_s` is None when waiting cannot help
    (the request alone is larger than the limit)."""

    def __init__(self, message: str, retry_after_s: float | None, state: RateState):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.state = state


@dataclass(frozen=True)
class BucketState:
    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True)
class RateState:
    """A tenant's buckets after an admission decision (for the x-ratelimit-* headers)."""

    requests: BucketState | None = None
    tokens: BucketState | None = None


class TenantQuota:
    """One tenant's live state: buckets, generations in flight, admission waiters."""

    def __init__(self, limits: TenantLimits, clock: Clock):
        self.clock = clock
        self.limits = limits
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.in_flight = 0  # generations admitted and not yet ended
        self.waiters: deque[tuple[int, asyncio.Future]] = deque()
        self.set_limits(limits)

    def set_limits(self, limits: TenantLimits) -> None:
        """New limits (a reload): a bucket that stays keeps its level (capped by the new capacity)."""
        self.limits = limits
        rpm = limits.requests_per_minute
        self.requests = self._bucket(self.requests, rpm, 1.0 if rpm else 0.0)
        self.tokens = self._bucket(self.tokens, limits.tokens_per_minute)
        self._wake()

    def _bucket(self, old: TokenBucket | None, per_minute: float | None, min_capacity: float = 0.0,
                ) -> TokenBucket | None:
        if per_minute is None:
            return None
        return TokenBucket(per_minute, self.clock, None if old is None else old.level, min_capacity)

    @property
    def max_queued(self) -> int:
        # Unset: no admission queue. Waiting is what overload must not turn into.
        return self.limits.max_queued or 0

    def state(self) -> RateState:
        def of(bucket: TokenBucket | None) -> BucketState | None:
            if bucket is None:
                return None
            return BucketState(int(bucket.capacity), max(0, math.floor(bucket.level)), bucket.time_to_full())

        return RateState(of(self.requests), of(self.tokens))

    def _fits(self, generations: int) -> bool:
        limit = self.limits.max_concurrent
        return limit is None or self.in_flight + generations <= limit

    def _ever_fits(self, generations: int) -> bool:
        limit = self.limits.max_concurrent
        return limit is None or generations <= limit

    def _wake(self) -> None:
        """Admit waiters in FIFO order while the first one fits (no overtaking: no starvation).
        A waiter's future gets True when admitted, False when it can never be: a reload lowered
        max_concurrent below its generations (left queued, it would block everyone behind it)."""
        while self.waiters:
            generations, future = self.waiters[0]
            if future.done():  # gave up (cancelled)
                self.waiters.popleft()
                continue
            if not self._ever_fits(generations):
                self.waiters.popleft()
                future.set_result(False)
                continue
            if not self._fits(generations):
                return
            self.waiters.popleft()
            self.in_flight += generations
            future.set_result(True)

    def release(self, generations: int) -> None:
        self.in_flight -= generations
        self._wake()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self.waiters


def _too_many_generations(tenant: Tenant, q: TenantQuota, generations: int) -> QuotaExceeded:
    """More generations than the tenant may ever run at once: waiting cannot help (no Retry-After)."""
    return QuotaExceeded(f"the request asks for {generations} generations; tenant {tenant.name!r} "
                         f"may run at most {q.limits.max_concurrent} at once", None, q.state())


class Quotas:
    """Every tenant's quota state, by name; survives reloads for tenants that remain."""

    def __init__(self, table: TenantTable, clock: Clock = time.monotonic):
        self.clock = clock
        self._tenants: dict[str, TenantQuota] = {}
        self._table = table
        self.update(table)

    def update(self, table: TenantTable) -> None:
        """A reloaded table: new limits for tenants that remain (their state kept), fresh state for
        new ones; a removed tenant's state goes once its last request ends."""
        self._table = table
        for name in list(self._tenants):
            tenant = table.get(name)
            if tenant is not None:
                self._tenants[name].set_limits(tenant.limits)
            elif self._tenants[name].idle:
                del self._tenants[name]

    def quota(self, tenant: Tenant) -> TenantQuota:
        q = self._tenants.get(tenant.name)
        if q is None:
            q = self._tenants[tenant.name] = TenantQuota(tenant.limits, self.clock)
        return q

    def state(self, tenant: Tenant) -> RateState:
        return self.quota(tenant).state()

    async def admit(self, tenant: Tenant, token_costs: list[int]) -> Lease:
        """Admit one request of `len(token_costs)` generations, each reserving `token_costs[i]`
        tokens (prompt + max_tokens); wait in the tenant's queue for concurrency if there is room
        there. Raises QuotaExceeded. Cancelling the wait leaves nothing taken."""
        q = self.quota(tenant)
        generations, tokens = len(token_costs), sum(token_costs)
        self._check_rates(tenant, q, tokens)
        if q.waiters or not q._fits(generations):
            limit = q.limits.max_concurrent
            if not q._ever_fits(generations):
                raise _too_many_generations(tenant, q, generations)
            if len(q.waiters) >= q.max_queued:
                raise QuotaExceeded(f"tenant {tenant.name!r} has {q.in_flight} generations in flight (limit "
                                    f"{limit}) and {len(q.waiters)} requests queued (limit {q.max_queued})",
                                    1.0, q.state())
            future = asyncio.get_running_loop().create_future()
            entry = (generations, future)
            q.waiters.append(entry)
            try:
                admitted = await future
            except BaseException:
                if future.done() and not future.cancelled() and future.result():  # admitted just as we gave up
                    q.release(generations)
                else:
                    future.cancel()
                    if entry in q.waiters:  # its place is free now, not when it reaches the head
                        q.waiters.remove(entry)
                    q._wake()  # a waiter behind us may fit now
                raise
            if not admitted:  # a reload lowered max_concurrent below what this request asks
                raise _too_many_generations(tenant, q, generations)
            self._check_rates(tenant, q, tokens, holding=generations)
        else:
            q.in_flight += generations
        if q.requests is not None:
            q.requests.take(1)
        if q.tokens is not None:
            q.tokens.take(tokens)
        return Lease(q, list(token_costs), q.state())

    def _check_rates(self, tenant: Tenant, q: TenantQuota, tokens: int, holding: int = 0) -> None:
        """Raise QuotaExceeded unless both buckets hold this request now (giving back the
        `holding` concurrency slots first)."""
        checks = [("requests", q.requests, 1), ("tokens", q.tokens, tokens)]
        waits = [(bucket.wait_for(amount), what, bucket, amount) for what, bucket, amount in checks if bucket]
        wait, what, bucket, amount = max(waits, key=lambda w: w[0], default=(0.0, "", None, 0))
        if wait <= 0:
            return
        if holding:
            q.release(holding)
        if wait == math.inf:  # waiting cannot help
            raise QuotaExceeded(f"the request needs {amount} {what} at once (tokens: prompt + max_tokens of "
                                f"every generation); tenant {tenant.name!r} may use {bucket.capacity:g} {what} "
                                "per minute", None, q.state())
        raise QuotaExceeded(f"tenant {tenant.name!r} is over its {what} per minute limit "
                            f"({bucket.capacity:g}); retry in {wait:.1f}s", wait, q.state())


@dataclass
class Lease:
    """What one admitted request holds. `end(i, used)` once per generation (as each ends);
    `cancel()` when the request is refused after admission (server full): all is given back,
    its request count included. Both are idempotent per generation."""

    quota: TenantQuota
    reserved: list[int]  # tokens reserved per generation
    state: RateState  # the buckets right after admission (x-ratelimit-* on success)
    _open: set[int] = field(default_factory=set)
    _ended_any: bool = False

    def __post_init__(self) -> None:
        self._open = set(range(len(self.reserved)))

    @property
    def done(self) -> bool:
        return not self._open

    def end(self, index: int, used_tokens: int) -> None:
        """Generation `index` ended having used `used_tokens` (prompt + generated): the rest of
        its reservation goes back to the tokens bucket, and its concurrency slot is freed."""
        if index not in self._open:
            return
        self._open.discard(index)
        self._ended_any = True
        if self.quota.tokens is not None:
            self.quota.tokens.give(max(0, self.reserved[index] - used_tokens))
        self.quota.release(1)

    def end_all(self) -> None:
        """Generations that never reported (never submitted): nothing used."""
        for index in sorted(self._open):
            self.end(index, 0)

    def cancel(self) -> None:
        """Refused after admission, before any generation ran: give everything back."""
        if not self._ended_any and self.quota.requests is not None and self._open:
            self.quota.requests.give(1)
        self.end_all()
