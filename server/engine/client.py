"""`EngineClient`: everything the HTTP side may ask of the engine, whichever process runs it.

Two implementations, chosen once by `--engine-process`:
- `ProcessEngine` (server/engine/core_client.py): the engine core in its own process
  (server/engine/core_process.py), requests and outputs over ZeroMQ (on: the default);
- `AsyncEngine` (server/engine/async_engine.py): the engine on a thread of the server's own
  process (off: one process, for tests and debugging, and where an `LLMEngine` is handed in).

Anything that changes engine state crosses as a *named* call (no lambdas: a function cannot be
sent to another interpreter). What a route needs for every request (tokenizer, limits, adapter
lookups, validation) is answered in the server's process without a round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from server.engine.request import GenerationRequest

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from server.adapters.manager import AdapterManager
    from server.config import Config
    from server.engine.async_engine import RequestStream
    from server.engine.engine_info import EngineInfo
    from server.metrics import Metrics
    from server.model.tokenizer import Tokenizer

ENGINE_GONE = "engine_unavailable"  # error code of requests cut off by the engine core's death (HTTP 503)


class EngineClient(Protocol):
    config: Config
    info: EngineInfo
    tokenizer: Tokenizer
    metrics: Metrics  # this process's metrics (the HTTP side's series; in-process also the engine's)
    adapters: AdapterManager | Any | None  # the manager, or its read replica in process mode
    max_pending: int

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None: ...
    def shutdown(self, timeout: float = 10.0) -> None: ...
    def close(self) -> None:
        """End of a graceful drain: refuse new requests, finish those in flight with "abort"."""

    @property
    def is_running(self) -> bool: ...
    @property
    def num_pending(self) -> int: ...

    # --- requests ----------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """InvalidRequestError now (a 400/404) for a request that could never run."""

    async def submit(self, request: GenerationRequest) -> RequestStream: ...
    def abort(self, request_id: str) -> None: ...

    # --- named calls, run between two steps -------------------------------------------------
    async def set_tenant_weights(self, weights: dict[str, float]) -> None: ...
    async def unregister_adapter(self, owner: str | None, name: str, *, delete_files: bool) -> Any: ...

    async def refresh_adapters(self) -> None:
        """Before a listing: make `adapters` current (a no-op where it is the engine's own manager)."""

    async def engine_metrics(self) -> list[Metric]:
        """The engine's metric families when they live in another process (else [])."""
