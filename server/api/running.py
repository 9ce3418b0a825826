"""Running admitted engine requests to their answer: an SSE response, returned once the first
output is in, or the whole result. Until an answer's first byte, an engine failure is an HTTP
status (`failure`) and a client that leaves aborts the requests (`until_disconnect`); after it,
a failure can only be an SSE error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from server.api.admission import LeasedStream
from server.api.errors import APIError
from server.api.responses import ChoiceAccumulator, merge, sse
from server.engine.async_engine import RequestFailedError
from server.engine.client import ENGINE_GONE
from server.engine.output_processor import RequestOutput

# (choice index, output) pairs, then (0, an SSE error event) if the engine fails mid-stream.
Outputs = AsyncIterator[tuple[int, RequestOutput | str]]


class EngineStreamResponse(StreamingResponse):
    """An SSE response whose engine requests are aborted however it ends: finished, client
    gone mid-stream, or gone before the first byte (when the body iterator never starts)."""

    def __init__(self, events: AsyncGenerator[str, None], merged: AsyncGenerator, streams: list[LeasedStream],
                 headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._merged = merged
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await _close(self._merged, self._streams)  # `events` never started: `merged` is still open


async def stream_response(raw: Request, streams: list[LeasedStream], headers: dict[str, str],
                          events: Callable[[Outputs], AsyncGenerator[str, None]]) -> EngineStreamResponse:
    """The SSE answer of `streams` (the choices of one request), `events(outputs)` as its body,
    returned once any choice's first output is in: a request the engine fails before that gets
    the HTTP error it gets unstreamed, and a client gone meanwhile aborts every choice."""
    merged = merge(streams)
    try:
        first = await until_disconnect(raw, anext(merged))
    except BaseException:
        await _close(merged, streams)
        raise
    return EngineStreamResponse(events(_guarded(_resumed(first, merged))), merged, streams, headers)


async def _resumed(first, rest: AsyncIterator):
    yield first
    async for item in rest:
        yield item


async def _guarded(stream: AsyncIterator) -> Outputs:
    """Pass a merged stream through; an engine failure mid-stream becomes one SSE error event
    (headers are already sent, so it cannot become an HTTP status any more)."""
    try:
        async for item in stream:
            yield item
    except RequestFailedError as exc:
        yield 0, sse(failure(exc).body())  # the error object the same failure gets unstreamed


async def _close(merged: AsyncGenerator, streams: list[LeasedStream]) -> None:
    await merged.aclose()
    for stream in streams:
        await stream.aclose()


async def collect(raw: Request, streams: list[LeasedStream]) -> list[ChoiceAccumulator]:
    """Every choice's whole result (an HTTP error if the engine fails one, 499 if the client leaves)."""
    acc = [ChoiceAccumulator() for _ in streams]

    async def run() -> None:
        async for index, out in merge(streams):
            acc[index].add(out)

    try:
        await until_disconnect(raw, run())
    finally:
        for stream in streams:
            await stream.aclose()
    return acc


async def until_disconnect(raw: Request, work):
    """Await `work` and return its result, cancelling it (and so aborting its requests, or
    leaving the admission queue) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself cancelled (a forced shutdown): so is its work
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "client disconnected", code="client_disconnected")
    try:
        return task.result()
    except RequestFailedError as exc:
        raise failure(exc) from exc


def failure(exc: RequestFailedError) -> APIError:
    """The OpenAI error of a request the engine failed (an HTTP status, or an SSE error event)."""
    if exc.code and exc.code.startswith("adapter_"):  # the adapter failed its full load (e.g. NaNs)
        return APIError(400, str(exc), code=exc.code)
    if exc.code == ENGINE_GONE:  # the engine core process died: the server cannot serve now
        return APIError(503, str(exc), code=exc.code)
    return APIError(500, str(exc), code=exc.code or "internal_error")
