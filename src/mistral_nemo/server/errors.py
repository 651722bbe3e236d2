"""Errors as the OpenAI API sends them: a status and `{"error": {message, type, param, code}}`.
Every error a client can cause is a 4xx; a failure of the engine is a 500."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.server.async_engine import Overloaded, ShuttingDown
from mistral_nemo.server.protocol import ErrorInfo, ErrorResponse

# Seconds a refused client should wait: about one decode step's worth of requests ending.
RETRY = {"Retry-After": "1"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type_, param=param, code=code)
        self.headers = headers

    def response(self) -> Response:
        body = ErrorResponse(error=self.info).model_dump_json()
        return Response(
            body, status_code=self.status, media_type="application/json", headers=self.headers
        )


def overloaded(e: Overloaded) -> APIError:
    message = f"the server is overloaded ({e}); retry later"
    return APIError(429, message, "rate_limit_error", code="overloaded", headers=RETRY)


def shutting_down(e: ShuttingDown) -> APIError:
    return APIError(503, str(e), "server_error", code="shutting_down")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Overloaded)
    async def on_overload(_: Request, e: Overloaded) -> Response:
        return overloaded(e).response()

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(_: Request, e: ShuttingDown) -> Response:
        return shutting_down(e).response()

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, e: InvalidRequestError) -> Response:
        return APIError(400, str(e), param=getattr(e, "param", None)).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(
                400, "the request body is not valid JSON", code="json_invalid"
            ).response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return APIError(
            400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None
        ).response()
