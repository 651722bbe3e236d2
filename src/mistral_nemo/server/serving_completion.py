"""`/v1/completions`: a text prompt (or its token ids) continued, streamed or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import Response

from mistral_nemo.sampling import TokenLogprob
from mistral_nemo.server.async_engine import RequestStream
from mistral_nemo.server.errors import APIError
from mistral_nemo.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from mistral_nemo.server.serving import OpenAIServing


class CompletionServing(OpenAIServing):
    async def create(self, body: CompletionRequest) -> Response:
        self.check_model(body.model)
        ids, is_text = self._prompt_ids(body.prompt)
        params = self.sampling_params(
            body, len(ids), body.max_tokens, body.logprobs, guided=self.guidance(body)
        )
        stream = await self.engine.submit(ids, params)
        rid = self.new_request_id("cmpl")
        if body.stream:
            return self.sse(self._chunks(rid, stream, body.include_usage))
        final = await self.final_output(stream)
        echo = self.tokenizer.decode(ids) if body.echo and is_text else ""
        return self.json_response(
            Completion(
                id=rid,
                created=int(time.time()),
                model=self.model_name,
                choices=[
                    CompletionChoice(
                        index=o.index,
                        text=echo + o.text,
                        finish_reason=o.finish_reason,
                        logprobs=self._logprobs(o.logprobs) if body.logprobs is not None else None,
                    )
                    for o in final.outputs
                ],
                usage=Usage(**final.usage),
            )
        )

    def _prompt_ids(
        self, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> tuple[list[int], bool]:
        """The ids of the one prompt a request may carry (a string or token ids, alone or in
        a list of one), and whether it was text."""
        one: object = prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported", param="prompt")
            one = prompt[0]
        if isinstance(one, str):
            return self.tokenizer.encode(one, bos=True), True
        if isinstance(one, list) and all(isinstance(i, int) for i in one):
            return list(one), False
        raise APIError(400, "prompt must be a string or a list of token ids", param="prompt")

    async def _chunks(
        self, rid: str, stream: RequestStream, include_usage: bool
    ) -> AsyncIterator[Completion]:
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        final = None
        async for out in stream:
            final = out
            for o in out.outputs:
                if o.delta or o.finish_reason is not None:
                    choice = CompletionChoice(
                        index=o.index, text=o.delta, finish_reason=o.finish_reason
                    )
                    yield chunk([choice])
        if include_usage and final is not None:
            yield chunk([], Usage(**final.usage))

    def _logprobs(self, lps: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if lps is None:
            return None
        piece = self.tokenizer.id_to_piece
        return CompletionLogprobs(
            tokens=[piece(x.token_id) for x in lps],
            token_logprobs=[x.logprob for x in lps],
            top_logprobs=[{piece(t): v for t, v in x.top.items()} for x in lps],
        )
