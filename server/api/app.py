"""The FastAPI app: engine lifecycle, error mapping, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from server.api.adapter_routes import router as adapter_router
from server.api import tenant_admin_routes as tenant_admin
from server.api.admin_routes import router as admin_router
from server.api.errors import APIError
from server.api.middleware import BodyLimit, CatchAll
from server.api.openapi import install as install_openapi
from server.api.openai_routes import router as openai_router
from server.api.service import Service
from server.api.shutdown import Drain, DrainGate
from server.config import Config
from server.engine.async_engine import AsyncEngine, EngineDeadError
from server.engine.client import EngineClient
from server.engine.engine import LLMEngine
from server.metrics import Metrics, exposition
from server.tenants import TenantFileError, TenantTable, load_tenants
from server.tenants.quotas import Quotas

log = logging.getLogger(__name__)

# Pydantic error types that deserve their own OpenAI error code: ours (schemas.py), and a
# value of the right type out of its range (docs/limits.md); the rest (a missing field, a
# wrong type) are `invalid_request`.
_VALIDATION_CODES = {"unsupported_field": "unsupported", "unsupported_value": "unsupported",
                     "invalid_unicode": "invalid_unicode", "invalid_value": "invalid_value",
                     **dict.fromkeys(["greater_than", "greater_than_equal", "less_than", "less_than_equal",
                                      "multiple_of", "finite_number", "too_short", "too_long",
                                      "string_too_short", "string_too_long", "string_pattern_mismatch",
                                      "literal_error", "enum"], "invalid_value")}


_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}  # a body that is not a JSON object
_BODY_PARSE_FAILED = "There was an error parsing the body"  # fastapi.routing's detail


def _unparsable_json(cause: BaseException | None, content_encoding: str | None) -> str:
    """What json.loads failed on, other than a syntax error (FastAPI keeps it as the cause)."""
    if isinstance(cause, UnicodeError):
        if content_encoding and content_encoding.lower() != "identity":
            return f"the request body is not UTF-8 JSON (Content-Encoding: {content_encoding} is not accepted: " \
                   "send the body uncompressed)"
        return "the request body is not UTF-8 text (JSON must be UTF-8)"
    if isinstance(cause, RecursionError):
        return "malformed JSON in the request body (nested too deeply)"
    if isinstance(cause, ValueError):
        return "malformed JSON in the request body (a number too long)"
    return "malformed JSON in the request body"


_READY_STATES = ["ready", "draining", "full", "engine_down"]
_READY_BODY = {"application/json": {"schema": {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": _READY_STATES}}}}}
_READY_RESPONSES = {200: {"description": "Ready for new requests", "content": _READY_BODY},
                    503: {"description": "Draining, full, or the engine has stopped", "content": _READY_BODY}}


def resolve_model_dir(config: Config) -> Path:
    if config.model.path:
        return Path(config.model.path)
    from server.model.default_model import ensure_default_model

    return ensure_default_model()


def tenant_table(config: Config) -> TenantTable:
    """The tenants of `--tenants`, else of `--api-keys`, else one open tenant."""
    if config.server.tenants:
        if config.server.api_keys:
            raise TenantFileError("give tenants either in --tenants or in --api-keys, not both")
        return load_tenants(config.server.tenants)
    if config.server.api_keys:
        return TenantTable.from_api_keys(config.server.api_keys)
    return TenantTable.open()


def build_engine(config: Config) -> LLMEngine:
    return LLMEngine(config, resolve_model_dir(config), Metrics())


def build_client(config: Config, engine: LLMEngine | None = None) -> EngineClient:
    """The engine on a thread here (given one, or `--engine-process off`), or in its own process."""
    if engine is None and config.server.engine_process:
        from server.engine.core_client import ProcessEngine

        return ProcessEngine(config, resolve_model_dir(config), max_pending=config.scheduler.pending_limit)
    return AsyncEngine(engine or build_engine(config), max_pending=config.scheduler.pending_limit)


def create_app(config: Config, engine: LLMEngine | None = None) -> FastAPI:
    tenants = tenant_table(config)  # a bad tenants file fails before an engine process is started
    client = build_client(config, engine)
    metrics = client.metrics

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        client.start()
        try:
            await client.set_tenant_weights({t.name: t.weight for t in _app.state.tenants})
            await tenant_admin.start(_app)
            yield
        finally:
            tenant_admin.stop()
            client.shutdown()

    app = FastAPI(title="loramux", version="0.1.0", lifespan=lifespan)
    app.state.service = Service(engine=client, tokenizer=client.tokenizer, base_model=client.info.model_name,
                                max_model_len=client.info.max_model_len, adapters=client.adapters)
    app.state.tenants = tenants
    app.state.tenants_file = config.server.tenants  # reloadable (SIGHUP, admin call); --api-keys is not
    app.state.tenants_reload_lock = asyncio.Lock()
    app.state.quotas = Quotas(app.state.tenants)
    app.state.admin_key = config.server.admin_key
    app.state.metrics = metrics
    app.state.drain = drain = Drain(timeout=config.server.shutdown_timeout)
    metrics.set_tenants(t.name for t in app.state.tenants)
    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(adapter_router)
    app.include_router(tenant_admin.router)
    install_openapi(app)

    def error(exc: APIError) -> JSONResponse:
        metrics.http_errors.labels(str(exc.status), exc.code or "").inc()
        return exc.response()

    # Outermost last: the body limit runs before anything reads the body, and a draining
    # server refuses before even that.
    app.add_middleware(CatchAll, on_error=error)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_body_bytes, on_error=error)
    app.add_middleware(DrainGate, drain=drain, on_error=error)

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(_request: Request, _exc: EngineDeadError) -> JSONResponse:
        # Any route that needs the engine (an admin load, a pin, an upload: calls to the core)
        # while it is dead or not answering: the server cannot serve this now, not a server bug.
        return error(APIError(503, "the engine is not running", code="engine_unavailable"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(APIError(400, "malformed JSON in the request body", code="invalid_json"))
        first = problems[0] if problems else {}
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
            # FastAPI parses JSON only when the Content-Type says so: `curl -d` without `-H` sends
            # a form type, and the body then reaches validation as bytes.
            sent = request.headers.get("content-type") or "no Content-Type"
            how = "" if "json" in sent else f" sent with Content-Type: application/json (this one: {sent})"
            return error(APIError(400, f"the request body must be a JSON object{how}", code="invalid_request"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
                            for p in problems[:5])
        code = _VALIDATION_CODES.get(first.get("type"), "invalid_request")
        return error(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keeps the exception's headers: a 405 must say which methods are allowed (`Allow`);
        # Starlette names only the first route of the path (/v1/adapters has GET and POST).
        headers = exc.headers
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED and "json" in request.headers.get(
                "content-type", ""):
            # FastAPI's answer when json.loads fails other than by a syntax error: bytes that are
            # not UTF-8 (e.g. a gzip body), nesting past the recursion limit, an integer of more
            # digits than Python converts.
            message = _unparsable_json(exc.__cause__, request.headers.get("content-encoding"))
            return error(APIError(400, message, code="invalid_json"))
        if exc.status_code == 405:
            path = request.scope.get("path", "")
            methods = sorted({m.upper() for template, item in app.openapi()["paths"].items()
                              if compile_path(template)[0].match(path) for m in item})
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return error(APIError(exc.status_code, str(exc.detail), code="http_error", headers=headers))

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 503 only once the engine loop has died (restart the server then); stays
        200 while draining, so a shutting-down server is not killed before its streams end."""
        ok = client.is_running
        return JSONResponse({"status": "ok" if ok else "engine_down"}, status_code=200 if ok else 503)

    @app.get("/ready", responses=_READY_RESPONSES)
    async def ready() -> JSONResponse:
        """Readiness: 200 while new requests are welcome; 503 while draining (shutdown) or while
        the queue is at its bound (`--max-waiting`), so a load balancer sends them elsewhere."""
        if not client.is_running:
            status = "engine_down"
        elif drain.draining:
            status = "draining"
        elif client.num_pending >= client.max_pending:
            status = "full"
        else:
            status = "ready"
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(exposition(metrics.registry, await client.engine_metrics()), media_type=CONTENT_TYPE_LATEST)

    return app
