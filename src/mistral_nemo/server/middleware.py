"""ASGI middleware: the API key, the request body limit, and load shedding."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistral_nemo.server.async_engine import AsyncEngine, Overloaded, ShuttingDown
from mistral_nemo.server.errors import APIError, overloaded, shutting_down


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


class Admission:
    """Refuses generation requests while the waiting queue is full (429) or the server is
    draining (503) before their bodies are read or parsed: under a storm, refusing must
    cost the event loop next to nothing, or /health waits behind the refusals."""

    GENERATION = frozenset({"/v1/chat/completions", "/v1/completions"})

    def __init__(self, app: ASGIApp, engine: AsyncEngine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.GENERATION:
            try:
                self.engine.check_admission()
            except Overloaded as e:
                await overloaded(e).response()(scope, receive, send)
                return
            except ShuttingDown as e:
                await shutting_down(e).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
