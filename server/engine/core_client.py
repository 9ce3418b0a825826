"""`ProcessEngine`: the `EngineClient` (server/engine/client.py) of an engine core running in its
own process (server/engine/core_process.py), so the HTTP server never holds its interpreter.

The server binds two ZeroMQ IPC sockets in a private temp directory and spawns the core, which
connects. Requests go down one channel as they are submitted; outputs come up the other, one
message per engine step, of token ids; an asyncio task of the server's event loop turns each
into text (server/engine/detokenizer.py: deltas, stop strings) and hands it to its request's
queue. A stop string found here ends the request for its client at once, and a FINISH message
retires it in the core (any output of a step the core ran meanwhile is dropped). Named calls
carry a call id and are answered on the same channel. When the core dies, every waiting
request and call fails at once (in-flight streams end with an error, new requests get 503),
never a hang. When it stops answering (it sends a heartbeat every second; silent for
--engine-heartbeat-timeout), or when its heartbeats say that the engine loop's current
iteration has run past --engine-step-timeout (a step that never returns while the process
lives), the server counts it as not running until it speaks again, resp. until a heartbeat
shows the loop moving: /health and /ready answer 503, new requests and calls get a fast 503,
and calls and admissions already waiting fail; streams in flight wait, and go on if it resumes.
Each step's outputs carry the core's time, from which the event loop observes the inter-token
latencies (Metrics.on_outputs).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from server.config import Config
from server.engine import wire
from server.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestStream
from server.engine.client import ENGINE_GONE
from server.engine.core_process import ENGINE_THREAD_CALLS, CoreReady, run_core
from server.engine.detokenizer import TextProcessor
from server.engine.engine_info import validate_request
from server.engine.output_processor import RequestOutput, failed_output
from server.engine.remote_adapters import RemoteAdapters
from server.engine.request import FinishReason, GenerationRequest
from server.metrics import Metrics
from server.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # model load, plus the C++ kernel build on a first start
_WATCH_MS = 500  # no message for this long: check that the core is still alive
REPLICA_REFRESH_S = 1.0


class ProcessEngine:
    def __init__(self, config: Config, model_dir: Path, max_pending: int = 1024):
        self.config = config
        self.max_pending = max_pending
        self.metrics = Metrics()  # the HTTP side's series; the core's arrive by engine_metrics()
        self.tokenizer = Tokenizer(model_dir)
        self._text = TextProcessor(self.tokenizer)  # the event loop's thread only
        self._dir = tempfile.mkdtemp(prefix=f"loramux-ipc-{os.getpid()}-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        calls_addr = f"ipc://{self._dir}/calls"
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.bind(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.bind(out_addr)
        # Calls the core answers on a worker thread (metrics, registration, snapshots) go on a
        # channel of their own, which the core reads while it steps: a scrape never waits for a step.
        self._calls_out = self._ctx.socket(zmq.PUSH)
        self._calls_out.setsockopt(zmq.SNDHWM, 0)
        self._calls_out.bind(calls_addr)
        # spawn, not fork: this process may already run threads (and torch's pools).
        self._proc = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(config, str(model_dir), in_addr, out_addr, calls_addr, os.getpid()),
            name="loramux-engine-core", daemon=True)
        self._proc.start()
        ready = self._wait_ready()
        self.info = ready.info
        self.adapters = RemoteAdapters(self, ready.snapshot, ready.step_capacity) if config.lora.enabled else None
        self._sinks: dict[str, asyncio.Queue] = {}
        self._admissions: dict[str, asyncio.Future] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._pending = 0
        self._closed = False
        self._dead = False
        # No message for this long (the core sends one every core_process.HEARTBEAT_S at most, from a
        # thread of its own, whatever its steps take): it is stopped or frozen.
        self._heartbeat_timeout = config.server.engine_heartbeat_timeout
        self._step_timeout = config.server.engine_step_timeout or float("inf")  # 0: no limit
        self._silent = False  # no message for the heartbeat timeout: not running until the core speaks again
        self._heard = time.monotonic()  # when the core's last message came
        self._step_age = 0.0  # the loop's current iteration, as of the last heartbeat (at _beat_at)
        self._beat_at = self._heard
        self._hung = False  # a heartbeat said the loop's iteration ran past the step timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        # Sent to the core and not answered yet: waiting, in the queue gauges (the core counts the rest).
        self.metrics.count_in_transit(self.info.model_name, lambda: len(self._admissions))
        self.metrics.watch_engine_loop(self.step_age)

    def _wait_ready(self) -> CoreReady:
        self._wait_for(self._out, zmq.POLLIN)
        kind, payload = self._out.recv_multipart()
        ready: CoreReady = wire.loads(payload)
        if kind != wire.READY or ready.error is not None:
            self._proc.join(10)
            self._release()
            raise wire.rebuild_error(ready.error) if ready.error else RuntimeError(f"unexpected {kind!r} from the core")
        # The core connected its input socket before it sent READY, but a connection completes in
        # the background: until our side has accepted it, a PUSH has no peer and a non-blocking
        # send (_send) fails, so the first call (the tenants' weights, at start) would be lost and
        # the server would never finish starting. Wait until the channel down is up.
        self._wait_for(self._in, zmq.POLLOUT)
        self._wait_for(self._calls_out, zmq.POLLOUT)
        log.info("engine core process %d ready", self._proc.pid)
        return ready

    def _wait_for(self, sock: zmq.Socket, event: int) -> None:
        waited = 0.0
        while not sock.poll(_WATCH_MS, event):
            waited += _WATCH_MS / 1000
            if not self._proc.is_alive() or waited > START_TIMEOUT_S:
                self._release()
                raise RuntimeError(f"the engine core process did not start (exit code {self._proc.exitcode})")

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """In the server's event loop (the app's lifespan): start reading the core's messages."""
        self._loop = asyncio.get_running_loop()
        self._heard = time.monotonic()
        self._aout = zmq.asyncio.Socket.from_socket(self._out)
        self._tasks = [self._loop.create_task(self._read(), name="loramux-core-reader")]
        if self.adapters is not None:
            self._tasks.append(self._loop.create_task(self._refresh_replica(), name="loramux-replica"))

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._proc.is_alive() and not self._silent and not self._hung:  # it would not read the STOP
            self._send(wire.STOP, b"")
            self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine core did not stop: terminating it")
            self._proc.kill()
            self._proc.join(5)
        for task in self._tasks:
            task.cancel()
        self._fail_everything("the server is shutting down")
        self._release()

    def _release(self) -> None:
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def close(self) -> None:
        self._closed = True
        self._send(wire.ABORT_ALL, b"")
        if self._silent or self._hung:  # it would not answer the abort: end the streams here (with an error event)
            self._fail_everything("the engine is not responding")

    @property
    def is_running(self) -> bool:
        return not self._dead and not self._silent and not self._hung and self._proc.is_alive()

    def step_age(self) -> float:
        """Seconds the core's loop has been in its current iteration (0 while it waits for work),
        extrapolated from the last heartbeat."""
        return self._step_age + (time.monotonic() - self._beat_at) if self._step_age else 0.0

    @property
    def num_pending(self) -> int:
        return self._pending

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # --- requests ------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        validate_request(request, self.info, self.config.lora, self.adapters)

    async def submit(self, request: GenerationRequest) -> RequestStream:
        if not self.is_running or self._closed:
            raise EngineDeadError("the server is shutting down" if self._closed else "the engine is not running")
        if self._pending >= self.max_pending:
            raise EngineOverloadedError(f"server overloaded: {self._pending} requests pending, try again later")
        rid = request.request_id
        sink: asyncio.Queue = asyncio.Queue()
        admitted = self._loop.create_future()
        self._sinks[rid] = sink
        self._admissions[rid] = admitted
        self._pending += 1
        self._text.add(rid, request.prompt_token_ids, request.params)  # before any output can arrive
        self._send(wire.ADD, wire.dumps(request))
        try:
            await admitted
        except BaseException:  # refused, or cancelled while waiting (the abort undoes a late admission)
            self._pending -= 1
            self._admissions.pop(rid, None)
            self.abort(rid)
            raise
        return RequestStream(self, rid, sink)

    def abort(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._text.remove(request_id)
        self.metrics.forget_request(request_id)
        if not self._dead:
            self._send(wire.ABORT, request_id.encode())

    # --- named calls ---------------------------------------------------------------------------
    async def call(self, method: str, *args, **kwargs) -> Any:
        """Run `EngineCore.call_<method>` in the core; its result, or its exception raised here."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send(wire.CALL, wire.dumps((call_id, method, args, kwargs)),
                   self._in if method in ENGINE_THREAD_CALLS else self._calls_out)
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def call_sync(self, method: str, *args, **kwargs) -> Any:
        """`call` from a worker thread (never the event loop's: it would wait on itself)."""
        if self._loop is None:
            raise EngineDeadError("the engine is not running")
        return asyncio.run_coroutine_threadsafe(self.call(method, *args, **kwargs), self._loop).result()

    async def set_tenant_weights(self, weights: dict[str, float]) -> None:
        await self.call("set_tenant_weights", weights)

    async def unregister_adapter(self, owner: str | None, name: str, *, delete_files: bool) -> Any:
        try:
            return await self.call("unregister_adapter", owner, name, delete_files=delete_files)
        finally:
            if self.adapters is not None and self.is_running:
                await self.adapters.refresh_async()

    async def refresh_adapters(self) -> None:
        if self.adapters is not None and self.is_running:
            await self.adapters.refresh_async()

    async def engine_metrics(self) -> list:
        try:
            return await self.call("metrics")
        except EngineDeadError:
            return []

    # --- the event loop's side of the channels ---------------------------------------------------
    def _send(self, kind: bytes, payload: bytes, sock: zmq.Socket | None = None) -> None:
        # Only from the event loop's thread (zmq sockets belong to one thread); never blocks: no HWM.
        try:
            (sock or self._in).send_multipart([kind, payload], zmq.NOBLOCK)
        except zmq.ZMQError:  # the context is gone (shutdown): nobody to tell
            pass

    async def _read(self) -> None:
        try:
            while True:
                if not await self._aout.poll(_WATCH_MS):
                    if not self._proc.is_alive():
                        self._on_death()
                        return
                    if not self._silent and time.monotonic() - self._heard > self._heartbeat_timeout:
                        self._on_silence()
                    continue
                kind, payload = await self._aout.recv_multipart()
                self._heard = time.monotonic()
                if self._silent:
                    self._silent = False
                    log.warning("the engine core process answers again: serving resumes")
                if kind == wire.HEARTBEAT:
                    self._on_heartbeat(wire.decode_heartbeat(payload))
                elif kind == wire.OUTPUTS:
                    self._deliver(*wire.decode_outputs(payload))
                elif kind == wire.ADMITTED:
                    rid, error = wire.loads(payload)
                    _settle(self._admissions.pop(rid, None), None, error)
                elif kind == wire.REPLY:
                    call_id, result, error = wire.loads(payload)
                    _settle(self._calls.get(call_id), result, error)
        except asyncio.CancelledError:
            raise
        except Exception:  # pragma: no cover - a bug here must not leave requests hanging
            log.exception("reading the engine core's messages failed")
            self._on_death()

    def _deliver(self, sent_at: float, outputs: list[RequestOutput]) -> None:
        # The others were aborted meanwhile, or ended here by a stop string.
        outputs = [out for out in outputs if out.request_id in self._sinks]
        self.metrics.on_outputs(outputs, sent_at)
        for out in outputs:
            rid = out.request_id
            sink = self._sinks[rid]
            try:
                if self._text.process(out):  # the core ran on meanwhile: the client got these tokens only
                    self._send(wire.FINISH, wire.dumps((rid, FinishReason.STOP, out.num_output_tokens)))
            except Exception as exc:  # detokenizing / stop matching: this request alone, as in-process
                log.exception("request %s failed while processing its output", rid)
                self._send(wire.FINISH, wire.dumps((rid, FinishReason.ERROR, None)))
                out = failed_output(rid, exc, out.num_prompt_tokens, out.num_output_tokens)
            if out.finished:
                del self._sinks[rid]
                self._text.remove(rid)
                self.metrics.forget_request(rid)  # a stop string found here ended it
            sink.put_nowait(out)

    async def _refresh_replica(self) -> None:
        while not self._dead:
            await asyncio.sleep(REPLICA_REFRESH_S)
            if not self.is_running:
                continue  # dead (the loop ends) or silent (the refreshes go on once it answers again)
            try:
                await self.adapters.refresh_async()
            except EngineDeadError:
                continue
            except Exception:  # pragma: no cover - keep the last replica
                log.exception("adapter registry refresh failed")

    def _on_death(self) -> None:
        if self._dead:
            return
        self._dead = True
        self._step_age = 0.0  # no loop runs any more: the gauge must not keep counting from the last beat
        log.error("the engine core process exited (code %s): failing the requests in flight",
                  self._proc.exitcode)
        self._fail_everything("the engine process exited")

    def _on_silence(self) -> None:
        """The core is alive but silent: refuse new work (is_running is False) and fail what waits
        for an answer (admissions, calls: each would hang its HTTP request). Streams in flight keep
        their places: their outputs come if the core resumes; if it never does, /health's 503 gets
        the server restarted."""
        self._silent = True
        log.error("the engine core process (pid %s) sent nothing for %.0f s: answering 503 until it does",
                  self._proc.pid, self._heartbeat_timeout)
        self._fail_waiters(EngineDeadError("the engine is not responding"))

    def _on_heartbeat(self, step_age: float) -> None:
        """The core lives; its loop has been `step_age` seconds in its current iteration. Past the
        step timeout it counts as hung, as a silent core does (its process answers, its loop does
        not), until a heartbeat shows the loop past that iteration."""
        self._step_age, self._beat_at = step_age, self._heard
        hung = step_age > self._step_timeout
        if hung and not self._hung:
            self._hung = True
            log.error("the engine loop's current step has run for %.1f s (--engine-step-timeout %g s): "
                      "answering 503 until it completes", step_age, self._step_timeout)
            self._fail_waiters(EngineDeadError("the engine is not responding"))
        elif self._hung and not hung:
            self._hung = False
            log.warning("the engine loop completed its step: serving resumes")

    def _fail_waiters(self, error: EngineDeadError) -> None:
        for future in [*self._admissions.values(), *self._calls.values()]:
            _settle(future, None, error)
        self._admissions.clear()

    def _fail_everything(self, message: str) -> None:
        for rid, sink in list(self._sinks.items()):
            sink.put_nowait(RequestOutput(rid, finished=True, finish_reason=FinishReason.ERROR, error=message,
                                          error_code=ENGINE_GONE))
            self.metrics.forget_request(rid)
        self._sinks.clear()
        self._text.clear()
        self._fail_waiters(EngineDeadError(message))


def _settle(future: asyncio.Future | None, result: Any, error: Any) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error if isinstance(error, BaseException) else wire.rebuild_error(error))
