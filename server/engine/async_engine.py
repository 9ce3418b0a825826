"""The engine loop thread and its bridge to asyncio.

One thread owns `LLMEngine` and calls `step()` while there is work; HTTP handlers talk
to it only through a command queue (add / abort) and receive outputs on per-request
asyncio queues, handed over once per step with `call_soon_threadsafe`. A handler that
stops listening (client gone) aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.engine.engine import LLMEngine
from server.engine.output_processor import RequestOutput
from server.engine.request import FinishReason, GenerationRequest, InvalidRequestError

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many queued requests: refuse new ones (HTTP 503) instead of queueing forever."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing more will be served."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request; other requests keep going."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class _Add:
    request: GenerationRequest
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    admitted: asyncio.Future  # settled by the engine thread: None, or the InvalidRequestError


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    pass


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class RequestStream:
    """The outputs of one admitted request, as an async iterator. Closing it before the last
    output (client gone, a sibling choice failed) aborts the request and frees its KV blocks."""

    def __init__(self, owner: AsyncEngine, request_id: str, sink: asyncio.Queue):
        self._owner = owner
        self.request_id = request_id
        self._sink = sink
        self._open = True

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._open:
            raise StopAsyncIteration
        out: RequestOutput = await self._sink.get()
        if out.error is not None:
            self._release()
            raise RequestFailedError(out.error, out.error_code)
        if out.finished:
            self._release()
        return out

    async def aclose(self) -> None:
        if self._open:
            self._release()
            self._owner.abort(self.request_id)

    def _release(self) -> None:
        self._open = False
        self._owner._pending -= 1


class AsyncEngine:
    """The in-process `EngineClient` (server/engine/client.py): the engine on a thread here."""

    def __init__(self, engine: LLMEngine, max_pending: int = 1024):
        self.engine = engine
        self.config = engine.config
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.metrics = engine.metrics
        self.adapters = engine.adapters
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}  # engine thread only
        self._pending = 0  # requests submitted and not yet finished (asyncio side)
        self._stop = False
        self._closed = False  # close() was called: no new requests
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.engine.wake = self._wake.set
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """End of a graceful shutdown (the drain time is up): refuse new requests and finish every
        request in flight with finish_reason "abort", so each stream gets a last output instead
        of hanging. The loop keeps running until shutdown()."""
        self._closed = True
        self._send(_AbortAll())

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None and not self._stop

    @property
    def num_pending(self) -> int:
        return self._pending

    # --- the asyncio side ----------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue `request` and return its output stream once the engine has admitted it.

        Raises EngineDeadError, EngineOverloadedError, or InvalidRequestError for a request the
        engine refuses at admission (e.g. its adapter was unloaded since it was validated), so
        the caller can still answer with an HTTP status. The caller must close the stream."""
        if not self.is_running or self._closed:
            raise EngineDeadError("the server is shutting down" if self._closed else "the engine is not running")
        if self._pending >= self.max_pending:
            raise EngineOverloadedError(f"server overloaded: {self._pending} requests pending, try again later")
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        admitted = loop.create_future()
        self._pending += 1
        self.engine.metrics.request_sent()  # counted as waiting now, not only once the engine thread takes it
        self._send(_Add(request, sink, loop, admitted))
        try:
            await admitted
        except BaseException:  # refused, or cancelled while waiting (the abort undoes a late admission)
            self._pending -= 1
            self.abort(request.request_id)
            raise
        return RequestStream(self, request.request_id, sink)

    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError now for a request that could never run (an HTTP 400),
        rather than failing it after it was queued."""
        self.engine.validate(request)

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between two steps; returns its result
        (or raises its exception). For changes that must not race a step. EngineDeadError
        when no engine thread is left to run it."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(_Call(fn, future, loop))
        return await future

    async def set_tenant_weights(self, weights: dict[str, float]) -> None:
        """The scheduler's fair-share weights, by tenant."""
        await self.call(lambda e: e.set_tenant_weights(weights))

    async def unregister_adapter(self, owner: str | None, name: str, *, delete_files: bool) -> Any:
        """AdapterManager.unregister between two steps (it never waits for requests to finish)."""
        return await self.call(lambda e: e.adapters.unregister(owner, name, delete_files=delete_files))

    async def refresh_adapters(self) -> None:
        pass  # `adapters` is the engine's own manager

    async def engine_metrics(self) -> list:
        return []  # the engine's series are in this process's registry already

    def _send(self, command: _Add | _Abort | _AbortAll | _Call) -> None:
        self._commands.put(command)
        self._wake.set()

    # --- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # outside any request's execution (scheduling): fail all, keep serving
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(f"internal engine error ({type(exc).__name__})")
                    continue
                self._deliver(outputs)
                if self.engine.idle:
                    # Everything left waits on adapter loads: sleep until a load or a command wakes us.
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as exc:  # pragma: no cover - unexpected: report it and stop
            self.error = exc
            log.exception("engine loop died")
        finally:
            self._stop = True
            self._fail_all("the server is shutting down")
            self._drain_commands()  # refuse what arrived meanwhile: no caller waits forever

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Call):
                if self._stop:
                    _call(cmd.loop, _settle, cmd.future, None, EngineDeadError("the server is shutting down"))
                    continue
                try:
                    result, error = cmd.fn(self.engine), None
                except Exception as exc:  # handed back to the awaiting coroutine
                    result, error = None, exc
                _call(cmd.loop, _settle, cmd.future, result, error)
            elif isinstance(cmd, _Add):
                self.engine.metrics.request_received()  # from here the scheduler's queue (or a refusal) accounts for it
                if self._stop:
                    _call(cmd.loop, _settle, cmd.admitted, None, EngineDeadError("the server is shutting down"))
                    continue
                try:
                    self.engine.add_request(cmd.request)
                except InvalidRequestError as exc:
                    _call(cmd.loop, _settle, cmd.admitted, None, exc)
                    continue
                self._sinks[cmd.request.request_id] = (cmd.sink, cmd.loop)
                _call(cmd.loop, _settle, cmd.admitted, None, None)
            elif isinstance(cmd, _AbortAll):
                self._abort_all()
            else:
                target = self._sinks.pop(cmd.request_id, None)
                self.engine.abort(cmd.request_id)
                if target is not None:  # after any output of it posted before (the loop runs them in order)
                    _call(target[1], self.metrics.forget_request, cmd.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._sinks[out.request_id]
            by_loop.setdefault(target[1], []).append((target[0], out))
        now = time.monotonic()
        for loop, items in by_loop.items():
            _call(loop, self._hand_over, items, now)

    def _hand_over(self, items: list[tuple[asyncio.Queue, RequestOutput]], produced_at: float) -> None:
        """On the event loop: one step's outputs to their streams, and their inter-token latencies
        to the metrics (per token, off the engine thread)."""
        self.metrics.on_outputs([out for _, out in items], produced_at)
        _put_all(items)

    def _post(self, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue, out: RequestOutput) -> None:
        _call(loop, self._hand_over, [(sink, out)], time.monotonic())

    def _abort_all(self) -> None:
        for request_id, (sink, loop) in list(self._sinks.items()):
            out = self.engine.abort(request_id) or RequestOutput(request_id, finished=True,
                                                                 finish_reason=FinishReason.ABORT)
            self._post(loop, sink, out)
        self._sinks.clear()

    def _fail_all(self, message: str) -> None:
        for request_id, (sink, loop) in list(self._sinks.items()):
            self.engine.abort(request_id)
            self._post(loop, sink, RequestOutput(request_id, finished=True, finish_reason=FinishReason.ERROR,
                                                 error=message, error_code="internal_error"))
        self._sinks.clear()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for sink, out in items:
        sink.put_nowait(out)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed (shutdown): nobody is listening
        pass
