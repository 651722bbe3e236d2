"""What a request gets back: its completions (CompletionOutput) in a RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_nemo.sampling import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "tool_calls" or None while running
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, str]] | None = None
    delta: str = ""  # text added since the previous output of this request (streaming)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # With SamplingParams.prompt_logprobs: each prompt token's, None where not scored.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        prompt = len(self.prompt_token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
