"""Two ASGI middlewares at the edge: a body-size limit on the bytes actually read, and a
last-resort catch that answers an unexpected exception with a 500 instead of a dropped connection."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

log = logging.getLogger(__name__)

ErrorResponder = Callable[[APIError], Response]


class BodyLimit:
    """Read each request's whole body before the app runs, refusing it with 413 as soon as the
    bytes read pass `max_bytes`, whatever Content-Length says (a chunked body declares none)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: ErrorResponder):
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: the app watches it for disconnects

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.on_error(APIError(413, f"request body over {self.max_bytes} bytes", code="body_too_large"))
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


class CatchAll:
    """Answer an exception no handler took with a 500 OpenAI error (traceback to the log, only
    the error type to the client). Letting it reach the server would drop a keep-alive
    connection that other requests of the same client may be using."""

    def __init__(self, app: ASGIApp, on_error: ErrorResponder):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # mid-response: no valid answer is possible any more
                raise
            await self.on_error(APIError(500, f"internal error ({type(exc).__name__})",
                                         code="internal_error"))(scope, receive, send)
