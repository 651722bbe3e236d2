"""ASGI middleware: the API key, and the request body limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistral_nemo.server.errors import APIError


class APIKeyAuth:
    """401 for a /v1/ request without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"].startswith("/v1/")
        if guarded and dict(scope["headers"]).get(b"authorization") != self.expected:
            error = APIError(401, "missing or invalid API key", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for request bodies over the limit, whether announced or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.error = APIError(413, f"request body exceeds {limit} bytes", code="too_large")
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self.error.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self.error
            return message

        try:
            await self.app(scope, limited, send)
        except APIError as e:
            await e.response()(scope, receive, send)
