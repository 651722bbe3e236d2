"""Sampling: what a request asks for (SamplingParams) and how the next token is drawn from
the logits, for one sequence (`sample`) or a batch with per-sequence settings
(`sample_batch`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mistral_nemo import kernels
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.structured import Guidance

# Mistral's recommended temperature for NeMo (much lower than for earlier Mistral models).
DEFAULT_TEMPERATURE = 0.3

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Sampling settings of one request, named as in vLLM and the OpenAI API."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables it
    min_p: float = 0.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top alternatives to report per generated token
    # Scoring (evaluation): the logprob of each prompt token from `prompt_logprobs_from` on,
    # with this many top alternatives; the prefix cache then serves only the tokens before
    # it. With prompt_logprobs, max_tokens may be 0: score the prompt, generate nothing.
    prompt_logprobs: int | None = None
    prompt_logprobs_from: int = 1
    # Tokens the completion may never produce (tool_choice "none": [TOOL_CALLS]).
    banned_token_ids: list[int] = field(default_factory=list)
    # Structured output: what the completion must match (a JSON schema, a regex, ...).
    guided: Guidance | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 or -1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                isinstance(self.max_tokens, int)
                and self.max_tokens >= (0 if self.prompt_logprobs is not None else 1),
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
            ),
            (isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be in 1..128, got {self.n}"),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in 0..{MAX_LOGPROBS}, got {self.prompt_logprobs}",
            ),
            (
                self.prompt_logprobs_from >= 1,
                f"prompt_logprobs_from must be >= 1, got {self.prompt_logprobs_from}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    def check_prompt(
        self,
        prompt: Sequence[int],
        vocab_size: int,
        context: int,
        context_name: str = "the context",
    ) -> None:
        """Refuse a prompt that is empty, has ids outside the vocabulary, or with max_tokens
        does not fit `context` tokens."""
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in 0..{vocab_size - 1}")
        if self.prompt_logprobs is not None and self.prompt_logprobs_from >= len(prompt):
            raise InvalidRequestError(
                f"prompt_logprobs_from {self.prompt_logprobs_from} leaves no token of the "
                f"prompt of {len(prompt)} tokens to score"
            )
        if len(prompt) + self.max_tokens > context:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens plus max_tokens {self.max_tokens} exceeds "
                f"{context_name} of {context} tokens"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the most likely alternatives: id -> logprob


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
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy.

    Draws by inverting the cumulative distribution with one uniform number per row, over the
    top-k / top-p candidates only (torch.multinomial takes ~3 ms for 131k tokens on a CPU).
    `generator` is one for the batch or one per row (a row's draw is then the same alone
    or in a batch).
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
    u = _uniform(cdf.shape[0], generator, cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _uniform(
    rows: int,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    device: torch.device,
) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, 1, generator=generator, device=device)
    return torch.cat([torch.rand(1, 1, generator=g, device=device) for g in generator])


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
    """Drop tokens less likely than min_p times the most likely one of their row (after
    temperature)."""
    if min_p <= 0:
        return logits
    cutoff = logits.amax(dim=-1, keepdim=True) + temperature * math.log(min_p)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """The logprob of each row's token (logits [rows, vocab], tokens [rows]) and of its `top`
    most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0].tolist()
    best = torch.topk(lp, top) if top else None
    return [
        TokenLogprob(
            int(token),
            chosen[i],
            dict(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True))
            if best is not None
            else {},
        )
        for i, token in enumerate(tokens.tolist())
    ]


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
    # Rows that sample alike go through `sample` together: one softmax over [rows, vocab]
    # instead of one per row (a 131k vocabulary makes each ~0.5 ms on a CPU).
    alike: dict[tuple[float, float, int, float], list[int]] = {}
    for i, p in enumerate(params):
        if p.penalized:
            logits[i] = apply_penalties(logits[i], p, prompts[i], outputs[i])
        if p.banned_token_ids:
            logits[i, p.banned_token_ids] = float("-inf")
        if p.greedy:
            rows.append(i)
        else:
            alike.setdefault((p.temperature, p.top_p, p.top_k, p.min_p), []).append(i)
    for (temperature, top_p, top_k, min_p), members in alike.items():
        block = logits if len(members) == len(params) else logits[members]
        block = apply_min_p(block, min_p, temperature)
        drawn = sample(block, temperature, top_p, top_k, [generators[i] for i in members])
        for i, token in zip(members, drawn.tolist(), strict=True):
            tokens[i] = int(token)
    if rows:  # all greedy rows in one call
        picked = argmax(logits if len(rows) == len(params) else logits[rows]).tolist()
        for i, token in zip(rows, picked, strict=True):
            tokens[i] = int(token)
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        # Logprobs of the model's distribution (after penalties, before temperature).
        top = max(params[i].logprobs or 0 for i in wanted)
        found = token_logprobs(logits[wanted], torch.tensor([tokens[i] for i in wanted]), top)
        for i, record in zip(wanted, found, strict=True):
            k = params[i].logprobs or 0
            record.top = dict(list(record.top.items())[:k])
            logprobs[i] = record
    return tokens, logprobs
