"""Reloading the tenants file without a restart: `POST /v1/admin/reload_tenants` (admin key)
and SIGHUP. A bad file is refused (400 with the reason; on SIGHUP, logged) and the old table
stays in force. Running requests are never disturbed: each holds its own `Tenant`, and the
quota state (buckets, slots in use) of tenants that remain is kept.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.api.admin_routes import require_admin
from server.api.errors import APIError
from server.api.openapi import error_responses
from server.engine.async_engine import EngineDeadError
from server.engine.client import EngineClient
from server.tenants import TenantFileError, TenantTable, load_tenants

log = logging.getLogger(__name__)

router = APIRouter()


class ReloadResponse(BaseModel):
    status: str
    tenants: list[str]


def tenants_file(app: FastAPI) -> str | None:
    return app.state.tenants_file


async def push_weights(app: FastAPI, table: TenantTable) -> None:
    """Tell the engine's scheduler the fair-share weights (on the engine thread, between steps)."""
    engine: EngineClient = app.state.service.engine
    weights = {t.name: t.weight for t in table}
    try:
        await engine.set_tenant_weights(weights)
    except EngineDeadError:
        log.warning("tenant weights not applied: the engine is not running")


async def reload_tenants(app: FastAPI) -> TenantTable:
    """Re-read the tenants file and swap it in; TenantFileError (old table kept) if it is bad."""
    path = tenants_file(app)
    if path is None:
        raise TenantFileError("this server has no tenants file to reload (start it with --tenants FILE)")
    async with app.state.tenants_reload_lock:  # two reloads at once apply in order
        table = await run_in_threadpool(load_tenants, path)
        app.state.tenants = table
        app.state.quotas.update(table)
        app.state.metrics.set_tenants(t.name for t in table)
        await push_weights(app, table)
    log.info("tenants reloaded from %s: %d tenants", path, len(table))
    return table


@router.post("/v1/admin/reload_tenants", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403))
async def reload_route(request: Request) -> ReloadResponse:
    try:
        table = await reload_tenants(request.app)
    except TenantFileError as exc:
        raise APIError(400, f"tenants file refused, the previous one stays in force: {exc}",
                       code="invalid_tenants_file") from exc
    return ReloadResponse(status="ok", tenants=sorted(t.name for t in table))


async def start(app: FastAPI) -> None:
    """At startup (engine running): push the weights once, and reload on SIGHUP where the
    platform has it."""
    loop = asyncio.get_running_loop()

    async def on_sighup() -> None:
        try:
            await reload_tenants(app)
        except TenantFileError as exc:
            log.error("SIGHUP: tenants file refused, the previous one stays in force: %s", exc)

    if hasattr(signal, "SIGHUP"):
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(on_sighup()))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests in-process)
            log.info("SIGHUP reload unavailable here; use POST /v1/admin/reload_tenants")


def stop() -> None:
    if hasattr(signal, "SIGHUP"):
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
