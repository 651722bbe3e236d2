"""`LLM`: the offline entry point, in the shape vLLM users know."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import torch

from mistral_nemo.engine.engine import Engine
from mistral_nemo.engine.outputs import RequestOutput
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.model import Transformer
from mistral_nemo.planner import parse_bytes
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.tokenizer import BaseTokenizer, load_tokenizer
from mistral_nemo.tokenizer.tool_calls import tool_call_answer

Prompt = str | Sequence[int]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


class LLM:
    """Load a model (checkpoint folder or GGUF file) and serve many prompts at once through
    the continuous-batching engine.

    The tokenizer comes from the checkpoint (`load_tokenizer`); `skip_tokenizer_init=True`
    loads none, for a checkpoint without one: prompts are then token ids and outputs carry
    ids only.

    `kv_cache_memory` sizes the paged KV cache (bytes or "4GiB"); by default it takes
    `memory_fraction` of the free memory, but no more than `max_num_seqs` full-length
    sequences need. `kv_cache_dtype` "fp8" stores keys and values in E4M3 (half of bf16).
    """

    def __init__(
        self,
        model: str | Path | Transformer,
        tokenizer: BaseTokenizer | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        max_model_len: int | None = None,
        kv_cache_memory: int | str | None = None,
        memory_fraction: float = 0.3,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        quantize: str | None = None,
        group_size: int = 128,
        kv_cache_dtype: str = "auto",
        skip_tokenizer_init: bool = False,
    ) -> None:
        self.path: str | Path = "model"
        if isinstance(model, Transformer):
            self.model = model
        else:
            self.path = model
            if tokenizer is None and not skip_tokenizer_init:
                tokenizer = load_tokenizer(model)  # first: a missing one fails fast
            self.model = Transformer.from_pretrained(
                model, dtype=dtype, device=device, quantize=quantize, group_size=group_size
            )
        self.tokenizer = tokenizer
        config = self.model.config
        max_len = min(max_model_len or config.max_seq_len, config.max_seq_len)
        kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype] or self.model.dtype
        per_block = config.kv_bytes_per_token(kv_dtype) * block_size
        if kv_cache_memory is None:
            budget = int(available_memory(self.model.device) * memory_fraction)
            budget = min(budget, max_num_seqs * -(-max_len // block_size) * per_block)
        else:
            budget = parse_bytes(kv_cache_memory)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory of {budget} bytes holds no block of "
                f"{block_size} tokens ({per_block} bytes)"
            )
        self.engine = Engine(
            self.model,
            tokenizer,
            num_blocks,
            block_size,
            max_len,
            max_num_seqs,
            max_num_batched_tokens,
            enable_prefix_caching,
            kv_dtype,
        )

    @property
    def kv_cache_bytes(self) -> int:
        return self.engine.cache.k.nbytes + self.engine.cache.v.nbytes

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "text prompts need a tokenizer; this LLM has none (skip_tokenizer_init): "
                    "pass token ids"
                )
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete every prompt (text, or token ids); outputs in the order of the prompts."""
        batch: list[Prompt] = [prompts] if _is_single(prompts) else list(prompts)  # type: ignore[list-item, arg-type]
        return self._run([self.encode(p) for p in batch], params or SamplingParams())

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        params: SamplingParams | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Answer one conversation or several (OpenAI message format). With tools, an answer
        that calls them has finish_reason "tool_calls" and the parsed `tool_calls`."""
        if self.tokenizer is None:
            raise InvalidRequestError("chat needs a tokenizer")
        tok = self.tokenizer
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            tok.encode_chat(c, tools, continue_final_message)  # type: ignore[arg-type]
            for c in conversations
        ]
        outputs = self._run(prompts, params or SamplingParams())
        for o in (o for out in outputs for o in out.outputs):
            if tools and (answer := tool_call_answer(tok, o.token_ids)) is not None:
                o.text, o.tool_calls, o.finish_reason = (
                    answer.content,
                    answer.tool_calls,
                    "tool_calls",
                )
        return outputs

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Generator[RequestOutput, None, None]:
        """Outputs of one request as it advances; each carries the new text in `delta`."""
        request_id = self.engine.add_request(self.encode(prompt), params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        ids = []
        try:
            for prompt in prompts:
                ids.append(self.engine.add_request(prompt, params))
            results: dict[str, RequestOutput] = {}
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
            return [results[i] for i in ids]
        finally:
            for i in ids:
                self.engine.abort(i)


def _is_single(prompts: Any) -> bool:
    return isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
