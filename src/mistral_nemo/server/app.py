"""The OpenAI-compatible HTTP API on FastAPI: the app, its middleware, error handlers and
routes. The routes only hand requests to the serving objects."""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import Response

from mistral_nemo.engine import LLM
from mistral_nemo.server.async_engine import AsyncEngine
from mistral_nemo.server.errors import install_error_handlers
from mistral_nemo.server.middleware import APIKeyAuth, BodyLimit
from mistral_nemo.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
)
from mistral_nemo.server.serving_chat import ChatServing
from mistral_nemo.server.serving_completion import CompletionServing

MAX_BODY_BYTES = 8 * 2**20


def create_app(
    llm: LLM,
    model_name: str = "mistral-nemo",
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """Serve `llm` as `model_name`; with `api_key`, /v1/ requests must bear it."""
    if llm.tokenizer is None:
        raise ValueError("the server needs a tokenizer")
    engine = AsyncEngine(llm.engine)
    context = llm.engine.max_model_len
    chat = ChatServing(engine, llm.tokenizer, model_name, context)
    completion = CompletionServing(engine, llm.tokenizer, model_name, context)
    models = ModelList(
        data=[ModelCard(id=model_name, created=int(time.time()), max_model_len=context)]
    )

    app = FastAPI(title="mistral-nemo", version="1")
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Health:
        return Health(running_requests=engine.running)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return models

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await chat.create(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        return await completion.create(body)

    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # outermost: before anything reads
    return app
