"""The engine core process (`--engine-process on`): `LLMEngine` and nothing of HTTP.

Its engine-loop thread (`loramux-engine-core`; the main thread only joins it) owns the engine and
loops: take every message waiting on the input channel, run one step while there is work, send
that step's outputs as one message. It sleeps in a
ZeroMQ poll when there is nothing to run, and is woken by the next message (or by an adapter
load finishing: the loader sends a wake message on an in-process socket of the same poll).
Named calls that change what a step sees (an adapter unregister, tenant weights) run on the
engine-loop thread between steps; registration I/O (admin loads, uploads), registry snapshots and
metric scrapes run on a worker thread, which answers on its own socket, so a step never waits
for a disk read. The core never detokenises: its outputs carry token ids, and the server
process turns them into text and finds stop strings (server/engine/detokenizer.py); a request a
stop string ended there comes back as a FINISH message, retired as "stop".

A heartbeat thread tells the server, every second, that the process runs and how long the loop's
current iteration has run (0 while it waits for work): a loop stuck in one step (a deadlock, a
kernel that never returns, a policy that loops) while the process is otherwise alive shows as a
growing age, and the server answers 503 past --engine-step-timeout (core_client.ProcessEngine).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from server.adapters.registry import AdapterEntry, AdapterRef, RegistryChanges
from server.config import Config
from server.engine import wire
from server.engine.device import resolve_device
from server.engine.engine import LLMEngine
from server.engine.engine_info import EngineInfo
from server.engine.output_processor import RequestOutput
from server.engine.request import FinishReason
from server.metrics import Metrics

log = logging.getLogger(__name__)

_WAKE_ADDR = "inproc://loramux-wake"
_IDLE_POLL_MS = 500  # nothing to run: also how often a core whose server died notices it
_LOADS_POLL_MS = 50  # everything waits on adapter loads (a finished load wakes us sooner)
ENGINE_THREAD_CALLS = ("unregister_adapter", "set_tenant_weights")  # the rest: a worker thread
HEARTBEAT_S = 1.0  # how often the core says it is alive, at most (the server's timeout: --engine-heartbeat-timeout)


def heartbeat_interval(config: Config) -> float:
    """HEARTBEAT_S, or less where a timeout is short (tests): several beats fit in either timeout
    (but at most 20 a second)."""
    server = config.server
    step = server.engine_step_timeout / 4 if server.engine_step_timeout > 0 else HEARTBEAT_S
    return max(0.05, min(HEARTBEAT_S, server.engine_heartbeat_timeout / 5, step))


@dataclass
class RegistrySnapshot:
    """What the server process's replica (server/engine/remote_adapters.py) needs to catch up:
    the registry's changes since the replica's generation, and every adapter resident anywhere
    (host cache, device pool; absent: neither). Both cost what changed or is resident, never
    what is registered: a server with 10,000 adapters refreshes once a second."""

    changes: RegistryChanges = field(default_factory=lambda: RegistryChanges(0, True))
    resident: dict[AdapterRef, tuple[bool, bool]] = field(default_factory=dict)


@dataclass
class CoreReady:
    """The core's first message: what the server needs to know of the engine it started."""

    info: EngineInfo | None = None
    step_capacity: int = 0
    snapshot: RegistrySnapshot | None = None
    error: tuple | None = None  # wire.error_state of a failed start (the server re-raises it)


def snapshot_of(engine: LLMEngine, generation: int = 0) -> RegistrySnapshot:
    m = engine.adapters
    if m is None:
        return RegistrySnapshot()
    return RegistrySnapshot(m.changes_since(generation), m.resident())


def reserve_a_core(config: Config) -> None:
    """Without --num-threads, the core's torch threads on a CPU of more than two cores leave one
    core to the server process (as vLLM's CPU backend reserves one for its API server): its HTTP,
    JSON, SSE and detokenising work then never preempts a thread that the others wait for at a
    barrier. On two cores that would halve the engine (measured: server / in-process throughput
    0.75 with one torch thread, 0.94 with two; docs/benchmarks.md section 6), so both are shared."""
    if config.model.num_threads or resolve_device(config.model.device).type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores > 2:
        config.model.num_threads = cores - 1
        log.info("engine core: %d torch threads, one core left to the server process (--num-threads to change)",
                 cores - 1)


def run_core(config: Config, model_dir: str, in_addr: str, out_addr: str, calls_addr: str, parent_pid: int) -> None:
    """The entry point of the core process (multiprocessing, spawn)."""
    # The server process decides when the core stops (a STOP message after its drain): a
    # Ctrl-C or SIGTERM sent to the whole process group must not cut the drain short, and a
    # SIGHUP (a tenants reload, or a closed terminal) is the server's to handle, not a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)
    out.connect(out_addr)
    reserve_a_core(config)
    try:
        engine = LLMEngine(config, Path(model_dir), Metrics(), detokenize=False)
    except BaseException as exc:
        # a configuration it cannot run: the server prints the message; anything else: the traceback
        log.error("the engine failed to start: %s", exc, exc_info=not isinstance(exc, ValueError))
        out.send_multipart([wire.READY, wire.dumps(CoreReady(error=wire.error_state(exc)))])
        out.close(linger=2000)
        ctx.term()
        return
    core = EngineCore(engine, ctx, in_addr, out_addr, out, parent_pid, calls_addr)
    out.send_multipart([wire.READY, wire.dumps(CoreReady(engine.info, engine.adapters.step_capacity
                                                         if engine.adapters else 0, snapshot_of(engine)))])
    # The loop runs on a thread of its own, as in-process: torch's CPU kernels called from a
    # process's main thread ran 5-10x slower than from another thread on a loaded 2-core machine
    # (OpenMP thread teams), and the main thread has nothing else to do.
    loop = threading.Thread(target=core.run, name="loramux-engine-core")
    loop.start()
    loop.join()


class EngineCore:
    def __init__(self, engine: LLMEngine, ctx: zmq.Context, in_addr: str, out_addr: str, out: zmq.Socket,
                 parent_pid: int, calls_addr: str | None = None):
        self.engine = engine
        self._ctx = ctx
        self._out = out
        self._out_addr = out_addr
        self._parent_pid = parent_pid
        self._calls_addr = calls_addr
        self._in = ctx.socket(zmq.PULL)
        self._in.setsockopt(zmq.RCVHWM, 0)
        self._in.bind(_WAKE_ADDR)
        self._in.connect(in_addr)
        self._live: set[str] = set()  # admitted, not finished, not aborted
        self._stop = False
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramux-core-io")
        self._stopped = threading.Event()  # ends the heartbeat
        # When the loop began its current iteration (monotonic; None while it waits for work): written
        # by the loop thread, read by the heartbeat thread (one reference: no lock).
        self._busy_since: float | None = None
        self._beat_s = heartbeat_interval(engine.config)
        self._local = threading.local()  # each worker thread's own output socket
        engine.wake = self._wake

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, name="loramux-core-heartbeat", daemon=True)
        heartbeat.start()
        calls = threading.Thread(target=self._read_calls, name="loramux-core-calls", daemon=True)
        if self._calls_addr is not None:
            calls.start()
        try:
            while not self._stop:
                busy = self.engine.has_unfinished()
                self._receive(0 if busy and not self.engine.idle else _LOADS_POLL_MS if busy else _IDLE_POLL_MS)
                if self._stop or not self.engine.has_unfinished():
                    if os.getppid() != self._parent_pid:  # the server is gone: nobody to serve
                        log.error("the server process exited; the engine core stops")
                        return
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # outside any request's execution: fail all, keep serving
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(f"internal engine error ({type(exc).__name__})")
                    continue
                self._send_outputs(outputs)
        finally:
            self._fail_all("the server is shutting down")
            self._stopped.set()
            heartbeat.join()
            if calls.is_alive():
                calls.join()
            self._workers.submit(self._close_worker_socket)  # the context ends only once every socket is closed
            self._workers.shutdown(wait=True)
            self._in.close(linger=0)
            self._out.close(linger=2000)
            self._ctx.term()

    def _receive(self, timeout_ms: int) -> None:
        """Handle every waiting message, after waiting up to `timeout_ms` for the first. The wait is
        the loop's only idle time: the iteration's clock starts when it ends."""
        self._busy_since = None
        ready = self._in.poll(timeout_ms)
        self._busy_since = time.monotonic()
        if not ready:
            return
        while True:
            try:
                kind, payload = self._in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(kind, payload)

    def _handle(self, kind: bytes, payload: bytes) -> None:
        if kind == wire.ADD:
            request = wire.loads(payload)
            try:
                self.engine.add_request(request)
                error = None
                self._live.add(request.request_id)
            except Exception as exc:  # refused at admission (e.g. its adapter is gone): still an HTTP status
                error = wire.error_state(exc)
            self._out.send_multipart([wire.ADMITTED, wire.dumps((request.request_id, error))])
        elif kind == wire.ABORT:
            request_id = payload.decode()
            self._live.discard(request_id)
            self.engine.abort(request_id)
        elif kind == wire.FINISH:
            request_id, reason, kept = wire.loads(payload)
            self._live.discard(request_id)
            self.engine.abort(request_id, reason, kept)
        elif kind == wire.ABORT_ALL:
            self._send_outputs([self.engine.abort(rid) or RequestOutput(rid, finished=True,
                                                                        finish_reason=FinishReason.ABORT)
                                for rid in list(self._live)])
            self._live.clear()
        elif kind == wire.CALL:
            call_id, method, args, kwargs = wire.loads(payload)
            if method in ENGINE_THREAD_CALLS:
                self._out.send_multipart([wire.REPLY, wire.dumps(self._call(call_id, method, args, kwargs))])
            else:
                self._workers.submit(self._call_on_worker, call_id, method, args, kwargs)
        elif kind == wire.STOP:
            self._stop = True
        # anything else (a loader's wake) only ended the poll

    def _read_calls(self) -> None:
        """The worker-thread calls' own channel, read while the engine loop steps: a metrics scrape
        (or an admin load) never waits for the step in progress to end."""
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self._calls_addr)
        try:
            while not self._stopped.is_set():
                if sock.poll(200):
                    _kind, payload = sock.recv_multipart()
                    self._workers.submit(self._call_on_worker, *wire.loads(payload))
        finally:
            sock.close(linger=0)

    # --- named calls ----------------------------------------------------------------------------
    def _call(self, call_id: int, method: str, args: tuple, kwargs: dict) -> tuple[int, Any, tuple | None]:
        try:
            return call_id, getattr(self, "call_" + method)(*args, **kwargs), None
        except Exception as exc:  # handed back to the caller, raised there
            return call_id, None, wire.error_state(exc)

    def _call_on_worker(self, call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        sock = getattr(self._local, "out", None)
        if sock is None:
            sock = self._local.out = self._ctx.socket(zmq.PUSH)
            sock.connect(self._out_addr)
        sock.send_multipart([wire.REPLY, wire.dumps(self._call(call_id, method, args, kwargs))])

    def _close_worker_socket(self) -> None:
        sock = getattr(self._local, "out", None)
        if sock is not None:
            sock.close(linger=1000)

    def call_unregister_adapter(self, owner: str | None, name: str, *, delete_files: bool) -> AdapterEntry:
        return self._manager().unregister(owner, name, delete_files=delete_files)

    def call_set_tenant_weights(self, weights: dict[str, float]) -> None:
        """The tenants file's weights; its tenant set also bounds this process's tenant series."""
        self.engine.set_tenant_weights(weights)
        self.engine.metrics.set_tenants(weights)

    def call_load_path(self, *args, **kwargs) -> AdapterEntry:
        return self._manager().load_path(*args, **kwargs)

    def call_upload(self, *args, **kwargs) -> AdapterEntry:
        return self._manager().upload(*args, **kwargs)

    def call_set_pinned(self, *args, **kwargs) -> AdapterEntry:
        return self._manager().set_pinned(*args, **kwargs)

    def call_snapshot(self, generation: int) -> RegistrySnapshot:
        return snapshot_of(self.engine, generation)

    def call_metrics(self) -> list:
        return list(self.engine.metrics.registry.collect())

    def _manager(self):
        if self.engine.adapters is None:
            raise RuntimeError("LoRA serving is off (--no-lora)")
        return self.engine.adapters

    # --- outputs ---------------------------------------------------------------------------------
    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        live = [o for o in outputs if o.request_id in self._live]  # else aborted meanwhile
        for o in live:
            if o.finished:
                self._live.discard(o.request_id)
        if live:
            self._out.send_multipart([wire.OUTPUTS, wire.encode_outputs(live, time.monotonic())])

    def _fail_all(self, message: str) -> None:
        failed = []
        for request_id in list(self._live):
            self.engine.abort(request_id)
            failed.append(RequestOutput(request_id, finished=True, finish_reason=FinishReason.ERROR,
                                        error=message, error_code="internal_error"))
        self._live.clear()
        if failed:
            self._out.send_multipart([wire.OUTPUTS, wire.encode_outputs(failed, time.monotonic())])

    def _heartbeat(self) -> None:
        """Every HEARTBEAT_S (less with short timeouts), how long the loop's current iteration has
        run, from a thread of its own with its own socket, so a long step never delays it: only a
        core that stopped running altogether (SIGSTOP, a frozen interpreter, a swap storm) falls
        silent, and a loop stuck in a step shows as an age that grows; the server then answers 503
        instead of letting requests and probes hang (core_client.ProcessEngine._read)."""
        sock = self._ctx.socket(zmq.PUSH)
        sock.connect(self._out_addr)
        try:
            while not self._stopped.wait(self._beat_s):
                since = self._busy_since
                age = 0.0 if since is None else time.monotonic() - since
                try:
                    sock.send_multipart([wire.HEARTBEAT, wire.encode_heartbeat(age)], zmq.NOBLOCK)
                except zmq.Again:  # the server is not reading: it will see it in what follows
                    pass
        finally:
            sock.close(linger=0)

    def _wake(self) -> None:
        """From an adapter loader thread: end the main loop's poll (a socket of its own: zmq
        sockets belong to one thread)."""
        try:
            sock = self._ctx.socket(zmq.PUSH)
        except zmq.ZMQError:  # the core is stopping
            return
        sock.connect(_WAKE_ADDR)
        sock.send_multipart([b"wake", b""])
        sock.close(linger=1000)
