"""Admin API: load, unload and pin adapters by path, for any owner, without a restart.

`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` take vLLM's bodies (plus an
optional `tenant`: absent, the adapter is shared) and answer as vLLM does where a client
can depend on it: 200 with a plain-text "Success: ..." line; 400 for a bad request or a
name already loaded; 404 for an unknown adapter or directory. Errors carry OpenAI's error
object. A load validates the whole adapter (config, header, shapes, NaN/Inf) once, off the
event loop, before it is registered. An unload answers at once: new requests get 404,
requests already holding the adapter finish with its weights, and its memory is freed
after the last one (see AdapterManager). Loading a name that is draining serves the new
version to new requests. Path loads live in this process only; the store
(`POST`/`DELETE /v1/adapters`, adapter_routes.py) is what survives a restart.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from server.adapters.errors import EXISTS, QUOTA, AdapterError
from server.adapters.manager import AdapterManager
from server.adapters.safe_files import MAX_PATH_CHARS
from server.adapters.store_layout import ADAPTER_NAME_RE, validate_adapter_name
from server.api.auth import bearer_token
from server.api.errors import APIError
from server.api.openapi import STATUS_TEXT, error_responses
from server.api.response_schemas import ErrorResponse, ModelCard
from server.api.schemas import RequestBody
from server.api.service import Service, adapter_card, adapter_error
from server.engine.async_engine import EngineDeadError
from server.tenants.table import TENANT_NAME_RE

log = logging.getLogger(__name__)

router = APIRouter()

_TENANT_SCHEMA = {"pattern": f"^{TENANT_NAME_RE.pattern}$"}
_PLAIN = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Success: ..."}}


def _json_errors(*statuses: int) -> dict[int, dict]:
    """Error responses of a plain-text route: still OpenAI's JSON error object."""
    schema = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    return {s: {"description": STATUS_TEXT[s], "content": {"application/json": {"schema": schema}}}
            for s in statuses}


def is_admin(request: Request) -> bool:
    """The admin key was presented; or no key of any kind is configured (a local dev server)."""
    admin_key = request.app.state.admin_key
    if admin_key is None:
        return request.app.state.tenants.open_access
    token = bearer_token(request)
    # bytes: compare_digest refuses str holding non-ASCII characters (a header may carry any latin-1 byte)
    return bool(token) and hmac.compare_digest(token.encode(), admin_key.encode())


def require_admin(request: Request) -> None:
    """With --admin-key: that bearer key. With tenant keys but no admin key: closed.
    With no keys at all (a local dev server): open."""
    if is_admin(request):
        return
    if request.app.state.admin_key is None:
        raise APIError(403, "the admin API is disabled: start the server with --admin-key", code="forbidden")
    raise APIError(401, "invalid or missing admin key", code="invalid_api_key")


def manager_of(request: Request) -> AdapterManager:
    svc: Service = request.app.state.service
    if svc.adapters is None:
        raise APIError(400, "LoRA serving is off (--no-lora)", code="lora_disabled")
    return svc.adapters


def check_tenant(request: Request, tenant: str | None) -> str | None:
    """An owner the admin names must be a tenant of the tenants file (None: shared)."""
    if tenant is not None and tenant not in request.app.state.tenants:
        raise APIError(400, f"no tenant named {tenant!r}", param="tenant", code="invalid_value")
    return tenant


async def unregister(request: Request, owner: str | None, name: str, *, delete_files: bool,
                     param: str | None = None) -> None:
    """Unregister on the engine thread (between steps; it never waits for requests to finish).
    `param`: the body field that named the adapter, if one did."""
    svc: Service = request.app.state.service
    try:
        await svc.engine.unregister_adapter(owner, name, delete_files=delete_files)
    except AdapterError as exc:
        raise adapter_error(exc, param) from exc
    except EngineDeadError as exc:
        raise APIError(503, "the engine is not running", code="engine_unavailable") from exc


class LoadAdapterRequest(RequestBody):
    # Constraints documented here and enforced where they are stated (the registry and
    # safe_files.locate: 400 adapter_invalid, before any file is read).
    lora_name: str = Field(json_schema_extra={"pattern": f"^{ADAPTER_NAME_RE.pattern}$"})
    lora_path: str = Field(json_schema_extra={"minLength": 1, "maxLength": MAX_PATH_CHARS,
                                              "pattern": r"^[^\x00]*$"})
    pinned: bool = False
    tenant: str | None = Field(default=None, json_schema_extra=_TENANT_SCHEMA)  # owner; absent: shared


class UnloadAdapterRequest(RequestBody):
    lora_name: str
    tenant: str | None = Field(default=None, json_schema_extra=_TENANT_SCHEMA)


# 400: invalid body, LoRA off, bad name or files, name already loaded (as vLLM); 401/403: admin
# key / admin API off, or a path outside the allowed roots; 404: no such directory.
@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_admin)], response_class=PlainTextResponse,
             responses={**_PLAIN, **_json_errors(400, 401, 403, 404, 413, 503)})
async def load_adapter(body: LoadAdapterRequest, request: Request) -> PlainTextResponse:
    manager = manager_of(request)
    owner = check_tenant(request, body.tenant)
    try:
        validate_adapter_name(body.lora_name)  # also checked by the registry; here, to name the field
    except AdapterError as exc:
        raise adapter_error(exc, "lora_name") from exc
    try:
        await run_in_threadpool(manager.load_path, owner, body.lora_name, body.lora_path, pinned=body.pinned)
    except AdapterError as exc:
        # The client sees str(exc) (file names only); the full path stays in the server log.
        log.info("admin load of %r refused: %s", body.lora_name, exc.detail)
        if exc.code == EXISTS:  # vLLM answers a name already loaded with 400
            raise APIError(400, str(exc), param="lora_name", code=exc.code) from exc
        raise adapter_error(exc, None if exc.code == QUOTA else "lora_path") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_admin)], response_class=PlainTextResponse,
             responses={**_PLAIN, **_json_errors(400, 401, 403, 404, 413, 503)})
async def unload_adapter(body: UnloadAdapterRequest, request: Request) -> PlainTextResponse:
    manager_of(request)
    await unregister(request, check_tenant(request, body.tenant), body.lora_name, delete_files=False,
                     param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/v1/adapters/{name}/pin", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404, 503))
async def pin_adapter(name: str, request: Request, tenant: str | None = None) -> ModelCard:
    return await _set_pinned(request, name, tenant, True)


@router.post("/v1/adapters/{name}/unpin", dependencies=[Depends(require_admin)],
             responses=error_responses(400, 401, 403, 404, 503))
async def unpin_adapter(name: str, request: Request, tenant: str | None = None) -> ModelCard:
    return await _set_pinned(request, name, tenant, False)


async def _set_pinned(request: Request, name: str, tenant: str | None, pinned: bool) -> ModelCard:
    manager = manager_of(request)
    try:  # on a worker thread: with the engine in its own process this is a call to it
        entry = await run_in_threadpool(manager.set_pinned, check_tenant(request, tenant), name, pinned)
    except AdapterError as exc:
        raise adapter_error(exc) from exc
    return adapter_card(entry, request.app.state.service.base_model, manager)
