"""Sampling and the single-request generation loop: prefill once, then one token per step
against the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.model import Transformer

# Mistral's recommended temperature for NeMo (much lower than for earlier Mistral models).
DEFAULT_TEMPERATURE = 0.3


def sample(
    logits: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_p: float, top_k: int, max_tokens: int) -> None:
    if not temperature >= 0:
        raise InvalidRequestError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")


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
) -> Iterator[int]:
    """Yield generated token ids one by one; stops after a stop id (yielded) or max_tokens."""
    check_sampling(temperature, top_p, top_k, max_tokens)
    context = model.config.max_seq_len
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt) + max_tokens > context:
        raise InvalidRequestError(
            f"prompt of {len(prompt)} tokens plus max_tokens {max_tokens} "
            f"exceeds the model's context of {context} tokens"
        )
    if max(prompt) >= model.config.vocab_size or min(prompt) < 0:
        raise InvalidRequestError(f"prompt token ids must be in 0..{model.config.vocab_size - 1}")
    stop = set(stop_ids) if stop_ids is not None else {model.config.eos_id}
    generator = None
    if seed is not None:
        generator = torch.Generator(model.device).manual_seed(seed)
    cache = model.new_cache(1, len(prompt) + max_tokens)
    tokens = torch.tensor([list(prompt)], device=model.device)
    logits = model(tokens, 0, cache, last_only=True)[:, -1]
    pos = len(prompt)
    for step in range(max_tokens):
        next_id = sample(logits, temperature, top_p, top_k, generator)
        token = int(next_id)
        yield token
        if token in stop or step == max_tokens - 1:
            return
        logits = model(next_id.view(1, 1), pos, cache)[:, -1]
        pos += 1
