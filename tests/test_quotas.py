"""Quota policy with a fake clock: token buckets, leases, the admission queue, reloads."""

from __future__ import annotations

import asyncio

import pytest

from server.tenants import Tenant, TenantLimits, TenantTable
from server.tenants.quotas import Quotas, QuotaExceeded, TokenBucket


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(**limits) -> Tenant:
    return Tenant("acme", limits=TenantLimits(**limits))


def quotas_for(t: Tenant, clock: FakeClock) -> Quotas:
    return Quotas(TenantTable([t]), clock=clock)


def test_bucket_refills_continuously_and_never_overfills():
    clock = FakeClock()
    b = TokenBucket(60, clock)  # 60 per minute = 1 per second
    assert b.wait_for(60) == 0 and b.wait_for(61) == float("inf")
    b.take(60)
    assert b.wait_for(1) == pytest.approx(1.0)
    clock.now += 0.5
    assert b.level == pytest.approx(0.5) and b.wait_for(2) == pytest.approx(1.5)
    assert b.time_to_full() == pytest.approx(59.5)
    clock.now += 1000
    assert b.level == 60
    b.give(10)
    assert b.level == 60


def test_under_one_request_a_minute_still_lets_one_through_then_waits():
    """0.5 a minute: one request every 2 minutes (before: a bucket of half a request, so every
    request was refused as larger than the limit, with no retry)."""
    clock = FakeClock()
    t = tenant(requests_per_minute=0.5)
    q = quotas_for(t, clock)

    async def go():
        (await q.admit(t, [5])).end(0, 5)
        with pytest.raises(QuotaExceeded) as exc:
            await q.admit(t, [5])
        assert exc.value.retry_after_s == pytest.approx(120.0)
        clock.now += 120
        (await q.admit(t, [5])).end(0, 5)
    asyncio.run(go())


def test_requests_per_minute_refuses_with_the_wait_until_a_request_fits():
    clock = FakeClock()
    t = tenant(requests_per_minute=2)
    q = quotas_for(t, clock)

    async def go():
        for _ in range(2):
            (await q.admit(t, [5])).end(0, 5)
        with pytest.raises(QuotaExceeded) as exc:
            await q.admit(t, [5])
        assert exc.value.retry_after_s == pytest.approx(30.0)  # 2/min: one request back every 30 s
        assert exc.value.state.requests.remaining == 0 and exc.value.state.requests.limit == 2
        clock.now += 29.9
        with pytest.raises(QuotaExceeded):
            await q.admit(t, [5])
        clock.now += 0.2
        lease = await q.admit(t, [5])
        assert lease.state.requests.remaining == 0

    asyncio.run(go())


def test_tokens_are_reserved_at_admission_and_the_unused_part_refunded():
    clock = FakeClock()
    t = tenant(tokens_per_minute=100)
    q = quotas_for(t, clock)

    async def go():
        a = await q.admit(t, [30, 30])  # two generations (n=2) of prompt 10 + max_tokens 20
        assert q.state(t).tokens.remaining == 40
        with pytest.raises(QuotaExceeded) as exc:
            await q.admit(t, [50])
        assert exc.value.retry_after_s == pytest.approx(6.0)  # 10 tokens missing at 100/60 per s
        a.end(0, 12)  # stopped early: 18 come back
        a.end(0, 12)  # a second report of the same generation changes nothing
        assert q.state(t).tokens.remaining == 58
        (await q.admit(t, [50])).end(0, 50)
        with pytest.raises(QuotaExceeded) as exc:  # larger than the whole minute: waiting cannot help
            await q.admit(t, [101])
        assert exc.value.retry_after_s is None

    asyncio.run(go())


def test_cancel_gives_back_the_request_and_all_tokens():
    clock = FakeClock()
    t = tenant(requests_per_minute=1, tokens_per_minute=100)
    q = quotas_for(t, clock)

    async def go():
        lease = await q.admit(t, [40])
        lease.cancel()
        lease.cancel()
        state = q.state(t)
        assert (state.requests.remaining, state.tokens.remaining) == (1, 100)
        assert q.quota(t).in_flight == 0

    asyncio.run(go())


def test_concurrency_queue_is_fifo_bounded_and_cancellable():
    clock = FakeClock()
    t = tenant(max_concurrent=2, max_queued=2)
    q = quotas_for(t, clock)

    async def go():
        first = await q.admit(t, [1, 1])  # both slots
        w1 = asyncio.create_task(q.admit(t, [1]))
        w2 = asyncio.create_task(q.admit(t, [1, 1]))
        await asyncio.sleep(0)
        assert len(q.quota(t).waiters) == 2
        with pytest.raises(QuotaExceeded) as exc:  # queue full: refused at once
            await q.admit(t, [1])
        assert exc.value.retry_after_s == 1.0
        with pytest.raises(QuotaExceeded) as exc:  # more than the bound alone: never
            await q.admit(t, [1, 1, 1])
        assert exc.value.retry_after_s is None
        first.end(0, 1)
        await asyncio.sleep(0)
        assert w1.done() and not w2.done()  # FIFO: w2 (2 slots) waits for both
        first.end(1, 1)
        await asyncio.sleep(0)
        assert not w2.done()  # w1 holds one slot, w2 needs two
        w3 = asyncio.create_task(q.admit(t, [1]))
        await asyncio.sleep(0)
        w3.cancel()  # a client that leaves while queued holds nothing
        await asyncio.gather(w3, return_exceptions=True)
        (await w1).end(0, 1)
        lease2 = await w2
        assert q.quota(t).in_flight == 2
        lease2.end_all()
        assert q.quota(t).idle

    asyncio.run(go())


def test_a_client_that_leaves_the_queue_frees_its_place_at_once():
    # before: a cancelled waiter behind the head stayed in the queue until it reached the head,
    # so new requests were refused as "queue full" while fewer were waiting
    clock = FakeClock()
    t = tenant(max_concurrent=1, max_queued=2)
    q = quotas_for(t, clock)

    async def go():
        first = await q.admit(t, [1])
        head = asyncio.create_task(q.admit(t, [1]))
        gone = asyncio.create_task(q.admit(t, [1]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        later = asyncio.create_task(q.admit(t, [1]))  # queued in the place it left, not refused
        await asyncio.sleep(0)
        assert not later.done()
        first.end(0, 1)
        (await head).end(0, 1)
        (await later).end(0, 1)
        assert q.quota(t).idle

    asyncio.run(go())


def test_unlimited_tenant_is_never_refused_and_no_queue_without_max_queued():
    clock = FakeClock()
    free, bounded = Tenant("free"), Tenant("bounded", limits=TenantLimits(max_concurrent=1))
    q = Quotas(TenantTable([free, bounded]), clock=clock)

    async def go():
        leases = [await q.admit(free, [10**6] * 8) for _ in range(100)]
        assert q.state(free).requests is None and q.state(free).tokens is None
        for lease in leases:
            lease.end_all()
        await q.admit(bounded, [1])
        with pytest.raises(QuotaExceeded):  # max_queued unset: no queue, a fast refusal
            await q.admit(bounded, [1])

    asyncio.run(go())


def test_reload_keeps_the_state_of_remaining_tenants_and_applies_new_limits():
    clock = FakeClock()
    t = tenant(requests_per_minute=10)
    q = quotas_for(t, clock)

    async def go():
        for _ in range(10):
            await q.admit(t, [1])
        assert q.state(t).requests.remaining == 0
        stricter = Tenant("acme", limits=TenantLimits(requests_per_minute=5))
        gone = Tenant("gone")
        q.update(TenantTable([stricter, gone]))
        assert q.state(stricter).requests.remaining == 0  # the spent bucket stays spent
        assert q.state(stricter).requests.limit == 5
        lease = await q.admit(gone, [1])
        q.update(TenantTable([stricter]))
        assert "gone" in q._tenants  # still has a request in flight
        lease.end_all()
        q.update(TenantTable([stricter]))
        assert "gone" not in q._tenants

    asyncio.run(go())


def test_a_reload_below_a_queued_requests_generations_refuses_it_and_unblocks_the_queue():
    """A request queued for 2 generations when a reload lowers max_concurrent to 1 can never run:
    it gets the refusal it would get now, and the requests behind it go on (before: it stayed at
    the head of the FIFO forever, and every later request of the tenant waited behind it)."""
    clock = FakeClock()
    t = tenant(max_concurrent=2, max_queued=2)
    q = quotas_for(t, clock)

    async def go():
        running = await q.admit(t, [1, 1])
        big = asyncio.create_task(q.admit(t, [1, 1]))
        small = asyncio.create_task(q.admit(t, [1]))
        await asyncio.sleep(0)
        q.update(TenantTable([tenant(max_concurrent=1, max_queued=2)]))
        with pytest.raises(QuotaExceeded) as exc:
            await asyncio.wait_for(big, 1)
        assert exc.value.retry_after_s is None and "at most 1 at once" in str(exc.value)
        assert not small.done()  # still 2 in flight, over the new limit of 1
        running.end_all()
        (await asyncio.wait_for(small, 1)).end_all()
        assert q.quota(t).idle

    asyncio.run(go())
