"""Log-likelihoods of continuations given contexts, scored by the engine.

Each (context, continuation) pair is one engine request that scores its prompt from the
continuation on (`SamplingParams.prompt_logprobs`) and generates nothing. Pairs that share
a context (the choices of one question) are sent in two waves: one first, and the others
once it has filled the prefix cache with the context, so the context is computed once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from mistral_nemo.engine import LLM, RequestOutput
from mistral_nemo.sampling import SamplingParams


@dataclass(frozen=True)
class Score:
    logprob: float  # sum over the continuation's tokens
    is_greedy: bool  # every continuation token was the most likely one
    tokens: int


def score_continuations(
    llm: LLM,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    progress: bool = False,
) -> list[Score]:
    """The Score of each (context ids, continuation ids) pair, in order. Contexts must not be
    empty (start them with BOS, as lm-eval does with an empty context)."""
    engine = llm.engine
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation must not be empty")
        by_context.setdefault(tuple(context), []).append(i)
    primers = deque(group[0] for group in by_context.values())
    followers = {group[0]: group[1:] for group in by_context.values()}
    index_of: dict[str, int] = {}
    scores: list[Score | None] = [None] * len(pairs)
    # Few requests wait at once, so that a context's blocks are still cached when the
    # other choices arrive (new prompts would take the least recently freed blocks).
    in_flight_limit = max(engine.max_num_seqs, 1)

    def submit(i: int) -> None:
        context, continuation = pairs[i]
        params = SamplingParams(max_tokens=0, prompt_logprobs=1, prompt_logprobs_from=len(context))
        index_of[engine.add_request([*context, *continuation], params)] = i

    bar = tqdm(total=len(pairs), disable=not progress, desc="scoring", unit="seq")
    try:
        while primers or index_of:
            while primers and len(index_of) < in_flight_limit:
                submit(primers.popleft())
            for out in engine.step():
                if not out.finished:
                    continue
                i = index_of.pop(out.request_id)
                scores[i] = _score(out, len(pairs[i][0]))
                bar.update()
                for j in followers.pop(i, []):
                    submit(j)
    finally:
        bar.close()
        for request_id in index_of:
            engine.abort(request_id)
    return [s for s in scores if s is not None]


def _score(out: RequestOutput, context_len: int) -> Score:
    records = (out.prompt_logprobs or [])[context_len:]
    total, greedy = 0.0, True
    for record in records:
        assert record is not None
        total += record.logprob
        greedy = greedy and max(record.top, key=record.top.__getitem__) == record.token_id
    return Score(total, greedy, len(records))
