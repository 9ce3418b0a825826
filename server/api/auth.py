"""Bearer key -> tenant, through the tenant table on `app.state.tenants` (reloadable)."""

from __future__ import annotations

from fastapi import Request

from server.api.errors import APIError
from server.tenants import Tenant, TenantTable


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def tenant_of(request: Request) -> Tenant:
    """The caller's tenant, or a 401. The admin key is not a tenant key."""
    table: TenantTable = request.app.state.tenants
    tenant = table.authenticate(bearer_token(request))
    if tenant is None:
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")
    return tenant
