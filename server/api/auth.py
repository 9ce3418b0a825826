"""API key -> tenant. With no keys configured the server is open and everyone is `default`."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import APIError


def tenant_of(request: Request) -> str:
    keys: dict[str, str] = request.app.state.api_keys
    if not keys:
        return "default"
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    for key, tenant in keys.items():
        if token and hmac.compare_digest(token, key):
            return tenant
    raise APIError(401, "invalid or missing API key", code="invalid_api_key")
