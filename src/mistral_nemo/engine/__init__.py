"""Serving engine: paged KV cache, continuous batching, prefix caching, chunked prefill."""

from mistral_nemo.engine.engine import Engine
from mistral_nemo.engine.llm import LLM
from mistral_nemo.engine.outputs import CompletionOutput, RequestOutput
from mistral_nemo.sampling import SamplingParams, TokenLogprob

__all__ = ["LLM", "CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "TokenLogprob"]
