"""Next tokens for a batch of sequences, each with its own sampling settings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mistral_nemo.engine.params import SamplingParams, TokenLogprob
from mistral_nemo.generate import argmax, sample


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """OpenAI presence/frequency penalties over the generated tokens, and the multiplicative
    repetition penalty (as in transformers and vLLM) over prompt and generated tokens."""
    if (params.presence_penalty or params.frequency_penalty) and output:
        ids = torch.tensor(output, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt, *output}), device=logits.device)
        chosen = logits[seen]
        chosen = torch.where(
            chosen > 0, chosen / params.repetition_penalty, chosen * params.repetition_penalty
        )
        logits = logits.index_copy(0, seen, chosen)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: float, temperature: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (after temperature)."""
    if min_p <= 0:
        return logits
    cutoff = logits.max() + temperature * math.log(min_p)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Token ids (and, where asked, logprobs) for logits [batch, vocab] in fp32."""
    tokens: list[int] = [0] * len(params)
    rows = []
    for i, p in enumerate(params):
        if p.penalized:
            logits[i] = apply_penalties(logits[i], p, prompts[i], outputs[i])
        if p.banned_token_ids:
            logits[i, p.banned_token_ids] = float("-inf")
        if len(outputs[i]) < len(p.prefix_token_ids):
            tokens[i] = p.prefix_token_ids[len(outputs[i])]  # forced, not sampled
            continue
        if p.greedy:
            rows.append(i)
            continue
        row = apply_min_p(logits[i], p.min_p, p.temperature)
        tokens[i] = int(sample(row[None], p.temperature, p.top_p, p.top_k, generators[i])[0])
    if rows:  # all greedy rows in one call
        picked = argmax(logits if len(rows) == len(params) else logits[rows]).tolist()
        for i, token in zip(rows, picked, strict=True):
            tokens[i] = int(token)
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        # Logprobs of the model's distribution (after penalties, before temperature).
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            k = params[i].logprobs or 0
            top = torch.topk(lp[j], k) if k else None
            logprobs[i] = TokenLogprob(
                tokens[i],
                float(lp[j, tokens[i]]),
                dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else {},
            )
    return tokens, logprobs
