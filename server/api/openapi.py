"""The OpenAPI document says what the server does: 400 (never FastAPI's 422) for invalid
input, every other error status a route returns with OpenAI's error body, and the SSE
stream of the generation routes, one JSON chunk per event then `[DONE]`.

Routes declare their own statuses (`responses=generation_responses(...)`); `install`
then applies what holds for every route (validation 400, the body-size 413) and documents
the plain (non-JSON) endpoints.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.api.response_schemas import ChatCompletionChunk, ErrorResponse

_REF = "#/components/schemas/{model}"
_STREAM_MODELS = (ChatCompletionChunk,)  # streamed-only shapes no route returns as JSON

STATUS_TEXT = {
    400: "Invalid request: a field is missing, of the wrong type, out of range or not supported, "
         "or the request can never fit the model's context",
    401: "Missing or invalid API key (servers started with --tenants / --api-keys / --admin-key)",
    403: "Forbidden (admin API disabled, a path outside the allowed adapter roots, another tenant named, "
         "or the tenant's adapter quota reached)",
    404: "Unknown model or adapter",
    409: "Conflict with the adapter's current state (name taken)",
    413: "Request body too large",
    429: "Over the tenant's rate limit or concurrency bound (Retry-After and x-ratelimit-* headers)",
    503: "Overloaded (too many pending requests; retry later), shutting down, or the engine is not running",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for error statuses, each with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": STATUS_TEXT[status]} for status in statuses}


def generation_responses(json_model: type[BaseModel], chunk_model: type[BaseModel]) -> dict[int | str, Any]:
    """`responses=` of a generation route: 200 as JSON or (stream: true) as SSE, whose events
    carry a chunk, an error object (a failure after the headers were sent), or `[DONE]`."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk_model.__name__)},
                                         {"$ref": _REF.format(model=ErrorResponse.__name__)}]}},
        ]}},
    }
    return {
        200: {"model": json_model, "description": "The result; with `stream: true`, server-sent events",
              "content": {"text/event-stream": {"itemSchema": event}}},
        **error_responses(400, 401, 404, 413, 429, 503),
    }


def install(app: FastAPI) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            app.openapi_schema = _correct(doc)
        return app.openapi_schema

    app.openapi = openapi


def _correct(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(m, "serialization") for m in (*_STREAM_MODELS, ErrorResponse)],
                                 ref_template=_REF)
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    error_body = {"description": "", "content": {"application/json": {"schema": {"$ref": _REF.format(
        model=ErrorResponse.__name__)}}}}
    for operation in (op for item in doc.get("paths", {}).values() for op in item.values()):
        responses = operation.setdefault("responses", {})
        responses.pop("422", None)  # the app answers invalid input with 400
        needed = ([400] if operation.get("requestBody") or operation.get("parameters") else []) + \
            ([413] if operation.get("requestBody") else [])
        for status in needed:
            responses.setdefault(str(status), {**error_body, "description": STATUS_TEXT[status]})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _document_plain_endpoints(doc.get("paths", {}))
    return doc


def _document_plain_endpoints(paths: dict[str, Any]) -> None:
    health = {"type": "object", "required": ["status"],
              "properties": {"status": {"type": "string", "enum": ["ok", "engine_down"]}}}
    if "get" in paths.get("/health", {}):
        paths["/health"]["get"]["responses"] = {
            "200": {"description": "The engine is running",
                    "content": {"application/json": {"schema": health}}},
            "503": {"description": "The engine has stopped", "content": {"application/json": {"schema": health}}},
        }
    if "get" in paths.get("/metrics", {}):
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
        }
