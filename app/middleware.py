"""Request-body size limit as a pure ASGI middleware (its 413 is a problem document, like every error)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, problem_response


def too_large_detail(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (MAXBATCH_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: by Content-Length up front, or while a chunked body streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(
                Request(scope),
                status=PayloadTooLarge.status,
                code=PayloadTooLarge.code,
                title=PayloadTooLarge.title,
                detail=too_large_detail(self.max_bytes),
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # raised inside the route's body read: the app's handler renders it as a 413 problem
                    raise HTTPException(413, too_large_detail(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)
