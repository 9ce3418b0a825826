"""Admission of a generation request: server capacity (503), the tenant's quotas (429), then
the engine. Every admitted request holds a `Lease` whose generations end exactly once each,
however their streams end (finished, failed, aborted, client gone): see `LeasedStream`.

Over a tenant's limit: 429 `rate_limit_exceeded`, `Retry-After` (whole seconds) and OpenAI's
headers `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset as a duration, e.g.
"1s", "6m0s", "120ms": until the bucket is full again). A request that could never pass (it
alone needs more than a minute's tokens, or more generations than max_concurrent): 400
`request_too_large`. Server full: 503 `overloaded` at once, `Retry-After: 1`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from fastapi import Request

from server.api.errors import APIError
from server.api.service import Service, overloaded
from server.api.shutdown import shutting_down
from server.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestStream
from server.engine.output_processor import RequestOutput
from server.engine.request import GenerationRequest, InvalidRequestError
from server.tenants import Tenant
from server.tenants.quotas import BucketState, Lease, Quotas, QuotaExceeded, RateState


def duration(seconds: float) -> str:
    """OpenAI's reset format: '120ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def rate_limit_headers(state: RateState) -> dict[str, str]:
    """x-ratelimit-* for the tenant's limited buckets (none for unlimited ones)."""
    headers = {}
    for what, bucket in (("requests", state.requests), ("tokens", state.tokens)):
        if isinstance(bucket, BucketState):
            headers[f"x-ratelimit-limit-{what}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(bucket.remaining)
            headers[f"x-ratelimit-reset-{what}"] = duration(bucket.reset_s)
    return headers


def invalid_request(exc: InvalidRequestError) -> APIError:
    status = 404 if exc.code == "model_not_found" else 400
    return APIError(status, str(exc), param=exc.param, code=exc.code)


class LeasedStream:
    """A RequestStream that ends generation `index` of its lease when it ends: last output,
    failure, or close (abort). Used tokens = prompt + tokens generated so far."""

    def __init__(self, stream: RequestStream, lease: Lease, index: int, prompt_tokens: int):
        self._stream = stream
        self._lease = lease
        self._index = index
        self._prompt_tokens = prompt_tokens
        self._generated = 0

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> LeasedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._stream.__anext__()
        except BaseException:
            self._end()
            raise
        self._generated = out.num_output_tokens
        if out.finished:
            self._end()
        return out

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._end()

    def _end(self) -> None:
        self._lease.end(self._index, self._prompt_tokens + self._generated)


def refuse_if_full(raw: Request, svc: Service, tenant: Tenant, generations: int = 1) -> None:
    """503 at once, before a request's prompts are read and tokenised, when the engine's queue is
    already full: under a burst each refusal then costs the server little more than its parsing.
    `generations` (prompts x n) over the whole queue is a 400 as early, whatever it would cost to tokenise."""
    try:
        svc.check_capacity(generations)
    except APIError as exc:
        if exc.code == "overloaded":
            raw.app.state.metrics.tenant_requests.labels(tenant.name, "overloaded").inc()
        raise


async def admit(raw: Request, svc: Service, tenant: Tenant, requests: list[GenerationRequest],
                until_disconnect: Callable[[Request, Awaitable], Awaitable]) -> tuple[list[LeasedStream], Lease]:
    """Admit every generation of one HTTP request into the engine, or none (an HTTP error).
    `until_disconnect(raw, work)` runs a wait in the tenant's queue so a client that leaves
    while queued frees its place."""
    metrics = raw.app.state.metrics
    quotas: Quotas = raw.app.state.quotas
    try:
        svc.check_capacity(len(requests))
        lease = await until_disconnect(raw, quotas.admit(tenant, [len(r.prompt_token_ids) + r.params.max_tokens
                                                                  for r in requests]))
    except QuotaExceeded as exc:
        metrics.tenant_requests.labels(tenant.name, "rate_limited").inc()
        headers = rate_limit_headers(exc.state)
        if exc.retry_after_s is None:
            raise APIError(400, str(exc), code="request_too_large", headers=headers) from exc
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        raise APIError(429, str(exc), code="rate_limit_exceeded", headers=headers) from exc
    except APIError as exc:
        if exc.code == "overloaded":
            metrics.tenant_requests.labels(tenant.name, "overloaded").inc()
        raise
    streams: list[LeasedStream] = []
    try:
        svc.check_capacity(len(requests))  # again: the server may have filled while this request queued
        for i, r in enumerate(requests):
            streams.append(LeasedStream(await svc.engine.submit(r), lease, i, len(r.prompt_token_ids)))
    except BaseException as exc:
        lease.cancel()  # refused after all: the request does not count against the tenant
        for stream in streams:
            await stream.aclose()
        if isinstance(exc, InvalidRequestError):  # e.g. its adapter was unloaded since validation
            raise invalid_request(exc) from exc
        if isinstance(exc, EngineOverloadedError) or (isinstance(exc, APIError) and exc.code == "overloaded"):
            metrics.tenant_requests.labels(tenant.name, "overloaded").inc()
            raise overloaded(str(exc)) from exc
        if isinstance(exc, EngineDeadError):
            if raw.app.state.drain.draining:  # it waited in its tenant's queue past the shutdown timeout
                raise shutting_down() from exc
            raise APIError(503, "the engine is not running", code="engine_unavailable") from exc
        raise
    return streams, lease
