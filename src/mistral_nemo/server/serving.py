"""What chat and completion serving share: the served model, turning a request's settings
into SamplingParams, running a request to its end, and streaming chunks as server-sent
events."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from mistral_nemo.engine import RequestOutput
from mistral_nemo.sampling import DEFAULT_TEMPERATURE, SamplingParams
from mistral_nemo.server.async_engine import AsyncEngine, EngineError, RequestStream, ShuttingDown
from mistral_nemo.server.errors import APIError, shutting_down
from mistral_nemo.server.metrics import current_record
from mistral_nemo.server.protocol import ErrorInfo, ErrorResponse, SamplingFields
from mistral_nemo.structured import Guidance
from mistral_nemo.tokenizer import BaseTokenizer


class OpenAIServing:
    def __init__(
        self, engine: AsyncEngine, tokenizer: BaseTokenizer, model_name: str, max_model_len: int
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling_params(
        self,
        body: SamplingFields,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        banned_token_ids: list[int] | None = None,
        guided: Guidance | None = None,
    ) -> SamplingParams:
        """The request's settings, OpenAI's defaults filled in; an unset max_tokens is the
        rest of the context. Raises InvalidRequestError (a 400) for values out of range."""
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            max_tokens=max(1, self.max_model_len - prompt_len)
            if max_tokens is None
            else max_tokens,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            seed=body.seed,
            n=body.n,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty or 1.0,
            logprobs=logprobs,
            ignore_eos=body.ignore_eos,
            banned_token_ids=banned_token_ids or [],
            guided=guided,
        )

    @staticmethod
    def guidance(body: SamplingFields) -> Guidance | None:
        """The structured output a request asks for: response_format (OpenAI) or one of the
        guided_* fields (vLLM)."""
        asked: dict[str, Guidance] = {}
        rf = body.response_format
        if rf is not None and rf.type == "json_object":
            asked["response_format"] = Guidance(json_object=True)
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise APIError(
                    400,
                    "response_format json_schema needs json_schema.schema",
                    param="response_format",
                )
            asked["response_format"] = Guidance(json_schema=rf.json_schema.json_schema)
        if body.guided_json is not None:
            schema = body.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise APIError(
                        400, f"guided_json is not JSON: {e}", param="guided_json"
                    ) from None
            asked["guided_json"] = Guidance(json_schema=schema)
        if body.guided_regex is not None:
            asked["guided_regex"] = Guidance(regex=body.guided_regex)
        if body.guided_choice is not None:
            asked["guided_choice"] = Guidance(choice=tuple(body.guided_choice))
        if body.guided_grammar is not None:
            asked["guided_grammar"] = Guidance(grammar=body.guided_grammar)
        if len(asked) > 1:
            raise APIError(
                400,
                f"choose one structured output, not {' and '.join(asked)}",
                param=next(iter(asked)),
            )
        return next(iter(asked.values()), None)

    @staticmethod
    def new_request_id(prefix: str) -> str:
        """A fresh id for an accepted request, noted in its log record."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        if (record := current_record.get()) is not None:
            record.request_id = request_id
        return request_id

    @staticmethod
    async def final_output(stream: RequestStream) -> RequestOutput:
        final = None
        try:
            async for out in stream:
                final = out
        except EngineError as e:
            if isinstance(e.__cause__, ShuttingDown):
                raise shutting_down(e.__cause__) from None
            raise APIError(500, f"the engine failed: {e}", "server_error") from None
        assert final is not None  # the stream ends with a finished output
        return final

    @staticmethod
    def json_response(body: BaseModel) -> Response:
        return Response(body.model_dump_json(), media_type="application/json")

    @staticmethod
    def sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
        """The chunks as server-sent events, then `[DONE]`. A failure of the engine after the
        response has started can only be told in the stream: as an error event."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except EngineError as e:
                info = ErrorInfo(message=str(e), type="server_error", param=None, code=None)
                yield f"data: {ErrorResponse(error=info).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
