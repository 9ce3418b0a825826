"""Adapters in the store, per tenant: list, upload, delete.

A tenant key acts on the tenant's own adapters and lists its own plus the shared ones; it
never sees another tenant's (they answer exactly as a name that does not exist: 404
model_not_found). The admin key acts on any owner: `tenant` (query parameter or form field)
names it; absent, the shared set. Tenant uploads count against the tenant's
`max_adapters` / `max_adapter_bytes` (403 quota_exceeded); the admin is not limited.

`POST /v1/adapters` is multipart: field `name`, files `adapter_config.json` and
`adapter_model.safetensors`. The body is bounded by --max-body-bytes like every body (raise
it to accept larger adapters); the adapter is validated in full (safe files, PEFT format,
shapes, NaN/Inf) in a temp directory and renamed into the store before it becomes visible
(AdapterManager.upload). `DELETE /v1/adapters/{name}` answers at once; requests already
running finish with the adapter's weights, and its files go when the last one has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.adapters.errors import AdapterError
from server.adapters.store_layout import CONFIG_NAME, WEIGHTS_NAME
from server.api.admin_routes import check_tenant, is_admin, manager_of, unregister
from server.api.auth import tenant_of
from server.api.errors import APIError, model_not_found
from server.api.openapi import error_responses
from server.api.response_schemas import ModelCard
from server.api.service import Service, adapter_card, adapter_error
from server.tenants import Tenant

router = APIRouter()


@dataclass(frozen=True)
class Caller:
    tenant: Tenant | None  # None: the admin

    def owner(self, request: Request, tenant_param: str | None) -> str | None:
        """Whose adapters this call acts on: the tenant's own; for the admin, `tenant_param` (None: shared)."""
        if self.tenant is None:
            return check_tenant(request, tenant_param)
        if tenant_param is not None and tenant_param != self.tenant.name:
            raise APIError(403, "only the admin key may act on another tenant's adapters", param="tenant",
                           code="forbidden")
        return self.tenant.name


def caller_of(request: Request) -> Caller:
    """The admin (admin key, or a server with no keys at all), else the key's tenant (or 401)."""
    return Caller(None) if is_admin(request) else Caller(tenant_of(request))


class AdapterStatus(ModelCard):
    location: str  # relative to its adapter root (never an absolute server path)
    resident_host: bool = False
    resident_device: bool = False


class DeletedAdapter(BaseModel):
    id: str
    object: str = "model"
    deleted: bool = True


@router.get("/v1/adapters", responses=error_responses(400, 401))
async def list_adapters(request: Request, caller: Caller = Depends(caller_of)) -> list[AdapterStatus | ModelCard]:
    """A tenant: its own adapters and the shared ones it may use. The admin: every adapter, with
    its place relative to its root and whether it is resident."""
    manager = manager_of(request)
    svc: Service = request.app.state.service
    await svc.engine.refresh_adapters()  # a listing shows what the engine knows now (ranks, residency)
    if caller.tenant is not None:
        return [adapter_card(e, svc.base_model, manager) for e in manager.visible(caller.tenant.name)]
    out = []
    for e in manager.entries():
        host, device = manager.residency(e.ref)
        card = adapter_card(e, svc.base_model, manager).model_dump()
        out.append(AdapterStatus(**card, location=e.summary.where.label, resident_host=host, resident_device=device))
    return out


# 400: a missing part, a bad name or bad files; 401: key; 403: over quota, or a tenant naming another
# tenant; 409: the name is taken; 413: body over --max-body-bytes.
@router.post("/v1/adapters", responses=error_responses(400, 401, 403, 409, 413, 503))
async def upload_adapter(
    request: Request,
    name: Annotated[str, Form(description="the adapter id")],
    config: Annotated[UploadFile, File(alias=CONFIG_NAME, description="PEFT adapter_config.json")],
    weights: Annotated[UploadFile, File(alias=WEIGHTS_NAME, description="PEFT adapter_model.safetensors")],
    tenant: Annotated[str | None, Form(description="owner (admin key only); absent: shared")] = None,
    caller: Caller = Depends(caller_of),
) -> ModelCard:
    manager = manager_of(request)
    owner = caller.owner(request, tenant or None)
    files = {CONFIG_NAME: await config.read(), WEIGHTS_NAME: await weights.read()}
    limits = caller.tenant.limits if caller.tenant is not None else None
    try:
        entry = await run_in_threadpool(
            manager.upload, owner, name, files,
            max_adapters=limits.max_adapters if limits else None,
            max_bytes=limits.max_adapter_bytes if limits else None)
    except AdapterError as exc:
        raise adapter_error(exc) from exc
    return adapter_card(entry, request.app.state.service.base_model, manager)


@router.delete("/v1/adapters/{name}", responses=error_responses(400, 401, 403, 404, 503))
async def delete_adapter(name: str, request: Request, tenant: str | None = None,
                         caller: Caller = Depends(caller_of)) -> DeletedAdapter:
    manager = manager_of(request)
    owner = caller.owner(request, tenant)
    if manager.get(owner, name) is None:  # shared or another tenant's: as if it did not exist
        raise model_not_found(name)
    try:
        await unregister(request, owner, name, delete_files=True)
    except APIError as exc:
        if exc.status == 404:  # deleted concurrently
            raise model_not_found(name) from exc
        raise
    return DeletedAdapter(id=name)
