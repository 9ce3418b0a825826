"""Graceful shutdown: the first SIGTERM (or Ctrl+C) drains instead of dropping connections.

Draining: /ready turns 503 (so a load balancer stops routing here), new HTTP requests get a
fast 503 with `Retry-After` while the listener stays open, and the requests already in
flight, streams included, run to their end. After `--shutdown-timeout` seconds whatever is
left is aborted: each stream still gets a last chunk (finish_reason "abort") and `[DONE]`, and a
request still waiting in its tenant's queue gets the same 503 as a new one.
Then uvicorn closes the listener, the lifespan stops the engine and the process exits 0.
A second signal cuts the wait short (abort now).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError
from server.api.middleware import ErrorResponder
from server.engine.client import EngineClient

log = logging.getLogger(__name__)

# Answered while draining and not counted as in flight: probes and scrapes must keep working.
UNGATED_PATHS = frozenset({"/health", "/ready", "/metrics"})
RETRY_AFTER_S = 1  # another replica can take the retry at once
FLUSH_S = 5.0  # after the abort: time for the last chunks to reach the clients


def shutting_down() -> APIError:
    """What a request gets that this draining server will not run (`Connection: close`, so a
    client's pooled connection to this replica is dropped too)."""
    return APIError(503, "the server is shutting down; retry on another replica", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})


@dataclass
class Drain:
    """Shared by the HTTP gate, /ready and the signal handling."""

    timeout: float  # seconds in-flight requests get after the signal
    draining: bool = False
    in_flight: int = 0  # HTTP requests being answered, UNGATED_PATHS not counted
    _cut: bool = field(default=False, init=False, repr=False)  # a second signal: abort now

    def cut(self) -> None:
        """Stop waiting for the requests in flight: abort them now."""
        self._cut = True

    async def run(self, engine: EngineClient) -> None:
        """Refuse new requests, wait for the ones in flight (at most `timeout` s), abort the rest."""
        self.draining = True
        log.info("draining: %d requests in flight, waiting up to %.0f s", self.in_flight, self.timeout)
        if await self._settled(self.timeout, cuttable=True):
            log.info("drained")
            return
        log.warning("shutdown timeout: aborting the %d requests still in flight", self.in_flight)
        engine.close()
        if not await self._settled(FLUSH_S):
            log.warning("%d requests still open after the abort; closing their connections", self.in_flight)

    async def _settled(self, seconds: float, cuttable: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.in_flight:
            if loop.time() >= deadline or (cuttable and self._cut):
                return False
            await asyncio.sleep(0.05)
        return True


class DrainGate:
    """ASGI middleware: counts the requests in flight, and refuses new ones while draining (`shutting_down`)."""

    def __init__(self, app: ASGIApp, drain: Drain, on_error: ErrorResponder):
        self.app = app
        self.drain = drain
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self.on_error(shutting_down())(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT runs `Drain.run` before uvicorn's own shutdown
    (which closes the listener at once). The signal is not re-raised at exit, so a drained
    server exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, engine: EngineClient):
        super().__init__(config)
        self.drain = drain
        self.engine = engine
        self._signals = 0
        self._task: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: only count here; on_tick (every 0.1 s, on the event loop) acts.
        self._signals += 1

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._task is None:
            self._task = asyncio.create_task(self.drain.run(self.engine))
        if self._signals > 1:
            self.drain.cut()
        if self._task is not None and self._task.done():
            return True
        return await super().on_tick(counter)
