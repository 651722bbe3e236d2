"""The single-request generation loop: prefill once, then one token per step against the
KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from mistral_nemo.model import KVCache, Transformer
from mistral_nemo.runtime import ModelRunner
from mistral_nemo.sampling import DEFAULT_TEMPERATURE, SamplingParams, sample


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: Sequence[int],
    max_tokens: int = 256,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: Iterable[int] | None = None,
    runner: ModelRunner | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one; stops after a stop id (yielded) or max_tokens.
    `runner` and `cache` (for the prompt and max_tokens) default to the fast path's and the
    model's own; tensor-parallel generation gives a plain runner and a cache of its heads."""
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed
    )
    config = model.config
    params.check_prompt(prompt, config.vocab_size, config.max_seq_len, "the model's context")
    stop = set(stop_ids) if stop_ids is not None else {config.eos_id}
    generator = None
    if seed is not None:
        generator = torch.Generator(model.device).manual_seed(seed)
    runner = runner or ModelRunner(model)
    cache = cache or model.new_cache(1, len(prompt) + max_tokens)
    tokens = torch.tensor([list(prompt)], device=model.device)
    logits = runner.logits(tokens, 0, cache, last_only=True)[:, -1]
    next_id = sample(logits, temperature, top_p, top_k, generator)
    pos = len(prompt)
    for step in range(max_tokens):
        token = int(next_id)
        yield token
        if token in stop or step == max_tokens - 1:
            return
        with runner.decoding(1):
            logits = runner.logits(next_id.view(1, 1), pos, cache)[:, -1]
            next_id = sample(logits, temperature, top_p, top_k, generator)
        pos += 1
