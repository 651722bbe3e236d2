"""The OpenAI-compatible HTTP API on FastAPI: chat completions (with tools), completions,
models, health. Every error a client can cause is a 4xx with an OpenAI error body."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mistral_nemo.engine import LLM, RequestOutput, SamplingParams
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.server.async_engine import AsyncEngine, EngineError
from mistral_nemo.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
)
from mistral_nemo.tokenizer.tool_calls import parse_output

MAX_BODY_BYTES = 8 * 2**20


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code}},
    )


class BodyLimit:
    """413 for request bodies over the limit, whether announced or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body exceeds {self.limit} bytes", code="too_large")
            return message

        try:
            await self.app(scope, limited, send)
        except APIError as e:
            await error_response(e.status, e.message, code=e.code)(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body exceeds {self.limit} bytes", code="too_large")
        await response(scope, receive, send)


def create_app(
    llm: LLM,
    model_name: str = "mistral-nemo",
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="mistral-nemo", version="1")
    engine = AsyncEngine(llm.engine)
    tok = llm.tokenizer
    assert tok is not None, "the server needs a tokenizer"
    context = llm.engine.max_model_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, e: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(e), param=getattr(e, "param", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="json_invalid")
        return error_response(
            400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None
        )

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        authorized = request.headers.get("authorization") == f"Bearer {api_key}"
        if api_key and request.url.path.startswith("/v1/") and not authorized:
            return error_response(401, "missing or invalid API key", code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(
        body: SamplingFields,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        **extra: Any,
    ) -> SamplingParams:
        if max_tokens is None:
            max_tokens = max(1, context - prompt_len)
        try:
            return SamplingParams(
                temperature=0.3 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                min_p=body.min_p or 0.0,
                max_tokens=max_tokens,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                seed=body.seed,
                n=body.n,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty or 1.0,
                logprobs=logprobs,
                ignore_eos=body.ignore_eos,
                **extra,
            )
        except InvalidRequestError as e:
            raise APIError(400, str(e)) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running_requests": engine.running}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "mistral-nemo",
                    "max_model_len": context,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        check_model(body.model)
        choice = body.tool_choice or "auto"
        tools = body.tools or None
        if tools is None and choice not in ("auto", "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        prompt = tok.encode_chat(body.messages, tools)
        extra: dict[str, Any] = {}
        calls = tok.special_ids.get("[TOOL_CALLS]", -1)
        if tools and choice == "none":
            extra["banned_token_ids"] = [calls]
        elif tools and choice == "required":
            extra["prefix_token_ids"] = [calls]
        elif tools and isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t["function"]["name"] for t in tools}:
                raise APIError(
                    400,
                    f"tool_choice names {choice.function.name!r}, which is not among the tools",
                    param="tool_choice",
                )
            start = json.dumps([{"name": choice.function.name, "arguments": 0}])
            extra["prefix_token_ids"] = [calls, *tok.encode(start[: start.index("0")].rstrip())]
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        params = sampling(
            body, len(prompt), body.max_completion_tokens or body.max_tokens, top, **extra
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        with_tools = bool(tools) and choice != "none"
        request_id = engine.submit(prompt, params)
        if body.stream:
            return stream(chat_chunks(rid, request_id, params, with_tools, body))
        final = await last_output(request_id)
        choices = []
        for o in final.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": o.text}
            finish = o.finish_reason
            if with_tools and calls in o.token_ids:
                parsed = parse_output(tok, o.token_ids)
                if parsed.tool_calls:
                    message = {
                        "role": "assistant",
                        "content": parsed.content or None,
                        "tool_calls": openai_calls(parsed.tool_calls),
                    }
                    finish = "tool_calls"
            choices.append(
                {
                    "index": o.index,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": chat_logprobs(o.logprobs) if body.logprobs else None,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": final.usage,
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt, bos=True)
        elif all(isinstance(i, int) for i in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
        else:
            raise APIError(400, "prompt must be a string or a list of token ids", param="prompt")
        params = sampling(body, len(ids), body.max_tokens, body.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        request_id = engine.submit(ids, params)
        if body.stream:
            return stream(completion_chunks(rid, request_id, body))
        final = await last_output(request_id)
        echo = tok.decode(ids) if body.echo and isinstance(prompt, str) else ""
        choices = [
            {
                "index": o.index,
                "text": echo + o.text,
                "finish_reason": o.finish_reason,
                "logprobs": completion_logprobs(o.logprobs) if body.logprobs is not None else None,
            }
            for o in final.outputs
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": final.usage,
        }

    async def last_output(request_id: str) -> RequestOutput:
        final = None
        try:
            async for out in engine.outputs(request_id):
                final = out
        except EngineError as e:
            raise APIError(500, f"the engine failed: {e}", "server_error") from None
        assert final is not None
        return final

    def openai_calls(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
        return [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls
        ]

    def chat_logprobs(lps: Any) -> dict[str, Any] | None:
        if lps is None:
            return None

        def entry(token: int, lp: float) -> dict[str, Any]:
            piece = tok.token_bytes(token)
            return {"token": tok.id_to_piece(token), "logprob": lp, "bytes": list(piece)}

        return {
            "content": [
                {
                    **entry(x.token_id, x.logprob),
                    "top_logprobs": [entry(t, v) for t, v in x.top.items()],
                }
                for x in lps
            ]
        }

    def completion_logprobs(lps: Any) -> dict[str, Any] | None:
        if lps is None:
            return None
        return {
            "tokens": [tok.id_to_piece(x.token_id) for x in lps],
            "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{tok.id_to_piece(t): v for t, v in x.top.items()} for x in lps],
        }

    async def chat_chunks(
        rid: str,
        request_id: str,
        params: SamplingParams,
        with_tools: bool,
        body: ChatCompletionRequest,
    ) -> AsyncIterator[dict[str, Any]]:
        base = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
        }
        calls = tok.special_ids.get("[TOOL_CALLS]", -1)
        for i in range(params.n):
            yield {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        sent_logprobs = [0] * params.n
        final = None
        async for out in engine.outputs(request_id):
            final = out
            for o in out.outputs:
                in_call = with_tools and calls in o.token_ids
                delta: dict[str, Any] = {}
                if o.delta and not in_call:
                    delta["content"] = o.delta
                finish = o.finish_reason
                if finish is not None and in_call:
                    parsed = parse_output(tok, o.token_ids)
                    if parsed.tool_calls:
                        delta["tool_calls"] = [
                            {"index": k, **c} for k, c in enumerate(openai_calls(parsed.tool_calls))
                        ]
                        finish = "tool_calls"
                    else:
                        delta["content"] = parsed.content
                choice: dict[str, Any] = {"index": o.index, "delta": delta, "finish_reason": finish}
                if body.logprobs and o.logprobs is not None:
                    choice["logprobs"] = chat_logprobs(o.logprobs[sent_logprobs[o.index] :])
                    sent_logprobs[o.index] = len(o.logprobs)
                if delta or finish is not None:
                    yield {**base, "choices": [choice]}
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield {**base, "choices": [], "usage": final.usage}

    async def completion_chunks(
        rid: str, request_id: str, body: CompletionRequest
    ) -> AsyncIterator[dict[str, Any]]:
        base = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        final = None
        async for out in engine.outputs(request_id):
            final = out
            for o in out.outputs:
                if o.delta or o.finish_reason is not None:
                    yield {
                        **base,
                        "choices": [
                            {
                                "index": o.index,
                                "text": o.delta,
                                "finish_reason": o.finish_reason,
                                "logprobs": None,
                            }
                        ],
                    }
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield {**base, "choices": [], "usage": final.usage}

    def stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def sse() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except (InvalidRequestError, EngineError) as e:
                error = {
                    "error": {
                        "message": str(e),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                }
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
