"""Sampling and the single-request generation loop: prefill once, then one token per step
against the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from mistral_nemo import kernels
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.model import Transformer

# Mistral's recommended temperature for NeMo (much lower than for earlier Mistral models).
DEFAULT_TEMPERATURE = 0.3


# top-p looks among this many best tokens first and ranks the whole vocabulary only when
# they hold less than top_p of the mass (sorting 131k logits costs ~10 ms on a CPU).
_TOP_P_CANDIDATES = 1024


def _nucleus(logits: torch.Tensor, k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and ids of the best tokens, best first, with -inf past the smallest set that
    holds top_p of the probability of the top-k distribution."""
    vocab = logits.shape[-1]
    values, ids = torch.topk(logits, min(k, _TOP_P_CANDIDATES) if k == vocab else k, dim=-1)
    log_z = torch.logsumexp(logits if k == vocab else values, dim=-1, keepdim=True)
    probs = (values - log_z).exp()
    if values.shape[-1] < k and bool((probs.sum(-1) < top_p).any()):
        values, ids = torch.sort(logits, dim=-1, descending=True)
        probs = (values - log_z).exp()
    keep = probs.cumsum(dim=-1) - probs <= top_p  # the best token is always kept
    return values.masked_fill(~keep, float("-inf")), ids


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids [batch] from logits [batch, vocab]. On CPU numpy's vectorized argmax is
    ~10x faster than torch's over a 131k vocabulary (same first-maximum tie rule), and the
    kernels' threads faster still on a serving step's logits."""
    if logits.device.type == "cpu":
        logits = logits.float()
        found = kernels.argmax(logits.reshape(-1, logits.shape[-1]))
        if found is not None:
            return found.view(logits.shape[:-1])
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy.

    Draws by inverting the cumulative distribution with one uniform number per row, over the
    top-k / top-p candidates only (torch.multinomial takes ~3 ms for 131k tokens on a CPU).
    """
    if temperature <= 0:
        return argmax(logits)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    ids: torch.Tensor | None = None
    if top_p < 1.0:
        logits, ids = _nucleus(logits, k, top_p)
    elif k < vocab:
        logits, ids = torch.topk(logits, k, dim=-1)
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


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
    next_id = sample(logits, temperature, top_p, top_k, generator)
    pos = len(prompt)
    light = model.kernels_take(1)
    for step in range(max_tokens):
        token = int(next_id)
        yield token
        if token in stop or step == max_tokens - 1:
            return
        # Sampling too, on one torch thread: torch's idle workers spin for a while after a
        # parallel op, taking the cores from the next step's kernels (measured: 1.35x slower).
        with kernels.one_token_steps(light):
            logits = model(next_id.view(1, 1), pos, cache)[:, -1]
            next_id = sample(logits, temperature, top_p, top_k, generator)
        pos += 1
