"""`/tokenize` and `/detokenize`, as vLLM has them: a prompt or a conversation to the ids
the model would see, and ids back to text."""

from __future__ import annotations

from mistral_nemo.server.errors import APIError
from mistral_nemo.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from mistral_nemo.server.serving import OpenAIServing


class TokenServing(OpenAIServing):
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = self.tokenizer.encode_chat(
                body.messages, body.tools, continue_final_message=body.continue_final_message
            )
        else:
            ids = self.tokenizer.encode(body.prompt or "", bos=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        for token in body.tokens:
            self.tokenizer.check_id(token)
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))
