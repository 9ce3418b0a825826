"""Admin API: load, unload, list and pin adapters without a restart.

`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` take vLLM's bodies, so
existing tooling works. A load validates the whole adapter (config, header, shapes,
NaN/Inf) off the event loop before it is registered, so a bad upload never becomes
servable; an unload happens on the engine thread between steps and is refused (409)
while queued or running requests still use the adapter.
"""

from __future__ import annotations

import hmac
import logging
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from server.adapters.errors import IN_USE, AdapterError
from server.adapters.peft_format import load_peft_adapter
from server.adapters.registry import AdapterRegistry
from server.adapters.safe_files import MAX_PATH_CHARS
from server.adapters.store_layout import ADAPTER_NAME_RE
from server.api.errors import APIError
from server.api.openapi import error_responses
from server.api.schemas import ModelCard, RequestBody
from server.api.service import Service, adapter_card, adapter_error
from server.engine.async_engine import EngineDeadError
from server.engine.engine import LLMEngine

log = logging.getLogger(__name__)

router = APIRouter()


def require_admin(request: Request) -> None:
    """With --admin-key: that bearer key. With tenant keys but no admin key: closed.
    With no keys at all (a local dev server): open."""
    admin_key = request.app.state.admin_key
    if admin_key is None:
        if not request.app.state.tenants.open_access:
            raise APIError(403, "the admin API is disabled: start the server with --admin-key", code="forbidden")
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not (token and hmac.compare_digest(token, admin_key)):
        raise APIError(401, "invalid or missing admin key", code="invalid_api_key")


def registry_of(request: Request) -> AdapterRegistry:
    svc: Service = request.app.state.service
    if svc.adapters is None:
        raise APIError(400, "LoRA serving is off (--no-lora)", code="lora_disabled")
    return svc.adapters.registry


class LoadAdapterRequest(RequestBody):
    # Constraints documented here and enforced where they are stated (the registry and
    # safe_files.locate: 400 adapter_invalid, before any file is read).
    lora_name: str = Field(json_schema_extra={"pattern": f"^{ADAPTER_NAME_RE.pattern}$"})
    lora_path: str = Field(json_schema_extra={"minLength": 1, "maxLength": MAX_PATH_CHARS,
                                              "pattern": r"^[^\x00]*$"})
    pinned: bool = False


class UnloadAdapterRequest(RequestBody):
    lora_name: str


class UnloadAdapterResponse(BaseModel):
    status: Literal["ok"]
    lora_name: str


class AdapterStatus(ModelCard):
    location: str  # relative to its adapter root (never an absolute server path)
    resident_host: bool = False
    resident_device: bool = False


# 400: invalid body, LoRA off, bad name or files; 401/403: admin key / admin API off, or a path
# outside the allowed roots; 404: no such directory; 409: name taken.
@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404, 409))
async def load_adapter(body: LoadAdapterRequest, request: Request) -> ModelCard:
    registry = registry_of(request)
    svc: Service = request.app.state.service

    def load():
        registry.check_name(body.lora_name)  # before any file is touched
        where = registry.check_allowed(body.lora_path)
        adapter = load_peft_adapter(where, registry.arch, name=body.lora_name, max_rank=registry.max_rank,
                                    max_bytes=registry.max_bytes)
        entry = registry.add(body.lora_name, where, "admin")
        return (registry.set_pinned(body.lora_name, True) if body.pinned else entry), adapter

    try:
        entry, adapter = await run_in_threadpool(load)
    except AdapterError as exc:
        # The client sees str(exc) (file names only); the full path stays in the server log.
        log.info("admin load of %r refused: %s", body.lora_name, exc.detail)
        raise adapter_error(exc) from exc
    svc.adapters.cache.offer(adapter)  # warm: resident in the host cache at the next step
    return adapter_card(entry, svc.base_model)


# 404: no such adapter; 409: queued or running requests use it.
@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404, 409, 503))
async def unload_adapter(body: UnloadAdapterRequest, request: Request) -> UnloadAdapterResponse:
    registry_of(request)
    svc: Service = request.app.state.service

    def unload(engine: LLMEngine) -> None:
        users = sum(1 for name in engine.scheduler.adapters_in_use() if name == body.lora_name)
        if users:
            raise AdapterError(IN_USE, f"adapter {body.lora_name!r} is in use by queued or running requests; "
                                       "retry when they finish")
        engine.adapters.registry.remove(body.lora_name)
        engine.adapters.forget(body.lora_name)

    try:
        await svc.engine.call(unload)
    except AdapterError as exc:
        raise adapter_error(exc) from exc
    except EngineDeadError as exc:
        raise APIError(503, "the engine is not running", code="engine_unavailable") from exc
    return UnloadAdapterResponse(status="ok", lora_name=body.lora_name)


@router.get("/v1/adapters", dependencies=[Depends(require_admin)], responses=error_responses(400, 401, 403))
async def list_adapters(request: Request) -> list[AdapterStatus]:
    registry = registry_of(request)
    svc: Service = request.app.state.service
    manager = svc.adapters
    return [AdapterStatus(**adapter_card(e, svc.base_model).model_dump(), location=e.summary.where.label,
                          resident_host=manager.cache.is_resident(e.name),
                          resident_device=manager.slots.is_resident(e.name))
            for e in registry.entries()]


@router.post("/v1/adapters/{name}/pin", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404))
async def pin_adapter(name: str, request: Request) -> ModelCard:
    return _set_pinned(request, name, True)


@router.post("/v1/adapters/{name}/unpin", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404))
async def unpin_adapter(name: str, request: Request) -> ModelCard:
    return _set_pinned(request, name, False)


def _set_pinned(request: Request, name: str, pinned: bool) -> ModelCard:
    try:
        entry = registry_of(request).set_pinned(name, pinned)
    except AdapterError as exc:
        raise adapter_error(exc) from exc
    return adapter_card(entry, request.app.state.service.base_model)
