"""The OpenAI-compatible HTTP API on FastAPI: the app, its middleware, error handlers and
routes. The routes only hand requests to the serving objects."""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from mistral_nemo.engine import LLM
from mistral_nemo.server.async_engine import AsyncEngine
from mistral_nemo.server.errors import install_error_handlers
from mistral_nemo.server.metrics import RequestLog, ServerMetrics
from mistral_nemo.server.middleware import Admission, APIKeyAuth, BodyLimit
from mistral_nemo.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mistral_nemo.server.serving_chat import ChatServing
from mistral_nemo.server.serving_completion import CompletionServing
from mistral_nemo.server.serving_tokens import TokenServing

MAX_BODY_BYTES = 8 * 2**20


def create_app(
    llm: LLM,
    model_name: str = "mistral-nemo",
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_waiting: int | None = None,
    json_logs: bool = False,
) -> FastAPI:
    """Serve `llm` as `model_name`; with `api_key`, /v1/ requests must bear it. With
    `max_waiting`, requests beyond that many waiting for a slot are refused with 429.
    `app.state.engine.drain(timeout)` is the graceful shutdown."""
    if llm.tokenizer is None:
        raise ValueError("the server needs a tokenizer")
    metrics = ServerMetrics(model_name)
    engine = AsyncEngine(llm.engine, max_waiting, metrics)
    context = llm.engine.max_model_len
    chat = ChatServing(engine, llm.tokenizer, model_name, context)
    completion = CompletionServing(engine, llm.tokenizer, model_name, context)
    tokens = TokenServing(engine, llm.tokenizer, model_name, context)
    models = ModelList(
        data=[ModelCard(id=model_name, created=int(time.time()), max_model_len=context)]
    )

    app = FastAPI(title="mistral-nemo", version="1")
    app.state.engine = engine
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Health:
        return Health(running_requests=engine.running)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        stats = engine.stats
        metrics.set_engine(stats.running, stats.waiting, stats.blocks_used, stats.blocks_free)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return tokens.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return tokens.detokenize(body)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return models

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await chat.create(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await completion.create(body)

    app.add_middleware(Admission, engine=engine)
    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # before anything reads
    app.add_middleware(RequestLog, metrics=metrics, json_lines=json_logs)  # sees every status
    return app
