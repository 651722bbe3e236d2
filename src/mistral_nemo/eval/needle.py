"""Needle in a haystack: can the model find one sentence anywhere in a long context?

A grid of prompts, one per (length, depth): the project's corpus cut so that the whole
prompt is exactly `length` of the model's own tokens (chat template included), with a
needle sentence holding a random number at the sentence boundary nearest `depth` of the
context, then a question asking for that number. The prompts and the needle follow
RULER's single-needle task (a "special magic number" for an adjective-noun key, the
question ending in an answer prefix). A cell scores the share of its needles whose number
appears in the greedy answer. Every cell goes through the engine in one batch.
"""

from __future__ import annotations

import bisect
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from mistral_nemo.engine import LLM, Engine, SamplingParams
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.report import write_atomic, write_json
from mistral_nemo.tokenizer import BaseTokenizer

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_TOKENS = 24  # the answer: a 7-digit number with a few words around it

INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the numbers afterwards."
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
TOKEN_COUNT = (
    "length = prompt_tokens: every token the model reads before answering, in its own "
    "tokenizer, i.e. the chat template (BOS, any default system prompt, role tokens) or "
    "BOS alone without --chat, the instructions, the haystack with the needle, the question "
    "and the answer's opening words"
)

ADJECTIVES = (
    "amber", "brisk", "crimson", "dusty", "eager", "faint", "gentle", "hollow",
    "idle", "jagged", "lunar", "mellow", "nimble", "olive", "quiet", "rustic",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "candle", "dune", "falcon", "glacier", "harbor", "lantern",
    "meadow", "orchard", "pebble", "quarry", "raven", "saddle", "thistle", "willow",
)  # fmt: skip


@dataclass(frozen=True)
class Needle:
    key: str
    value: str

    @classmethod
    def draw(cls, seed: int, length: int, depth: float, sample: int) -> Needle:
        """The needle of one cell and sample: the same for the same seed on any model."""
        rng = random.Random(f"{seed}/{length}/{depth}/{sample}")
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        return cls(key, str(rng.randrange(1_000_000, 10_000_000)))

    @property
    def sentence(self) -> str:
        return NEEDLE.format(key=self.key, value=self.value)


@dataclass(frozen=True)
class Cell:
    """One prompt of the grid and where its needle landed, in token positions."""

    length: int
    depth: float
    sample: int
    needle: Needle
    prompt: list[int]
    context: tuple[int, int]  # token span of the haystack with the needle in it
    needle_span: tuple[int, int]

    @property
    def needle_depth(self) -> float:
        """Where the needle starts, as a fraction of the haystack around it (0: first, 1:
        last)."""
        start, end = self.context
        room = (end - start) - (self.needle_span[1] - self.needle_span[0])
        return (self.needle_span[0] - start) / room if room > 0 else 0.0


class Haystack:
    """The corpus in the model's tokens, cut to a length with a needle put into it.

    Prompts are put together in tokens: the frame (chat template, instructions, question)
    around `size` corpus tokens with the needle's tokens among them. So a prompt's length
    is exact by construction, and every prompt starts with the same tokens up to its
    needle, which the engine's prefix cache shares.
    """

    def __init__(self, tokenizer: BaseTokenizer, text: str, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.tokens = tokenizer.encode(text)
        self.corpus_tokens = len(self.tokens)
        self.separator = tokenizer.encode("\n\n")
        self.boundaries = self._find_boundaries(0)

    def cell(self, length: int, depth: float, sample: int, needle: Needle) -> Cell:
        """The prompt of exactly `length` tokens with `needle` at `depth` of its haystack."""
        head, tail = self._frame(needle)
        fixed = len(head) + len(tail)
        at_end = self.tokenizer.encode(f" {needle.sentence}")  # the frame's newline follows
        size = length - fixed - len(at_end)
        if size <= 0:
            raise InvalidRequestError(
                f"length {length} is too short: the prompt without haystack takes "
                f"{length - size} tokens"
            )
        self._grow(length)
        insert = self._boundary(depth * size, size)
        ids = at_end
        if insert < size:
            # Inside the haystack the needle's neighbours stay put whatever the size, so its
            # tokens, and with them the size that makes `length`, are known.
            inside = self._needle(needle, insert)
            if insert < length - fixed - len(inside):
                ids, size = inside, length - fixed - len(inside)
            else:  # it would push itself off the end: put it there
                insert = size
        hay = self.tokens
        prompt = [*head, *hay[:insert], *ids, *hay[insert:size], *tail]
        at = len(head) + insert
        context = (len(head), len(head) + size + len(ids))
        return Cell(length, depth, sample, needle, prompt, context, (at, at + len(ids)))

    def _frame(self, needle: Needle) -> tuple[list[int], list[int]]:
        """The prompt's tokens before and after its context: what two prompts with different
        one-digit contexts have in common at either end."""
        a, b = self._render("0", needle), self._render("1", needle)
        head = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        tail = len(a) - head - 1
        if len(a) != len(b) or a[head:-tail] != self.tokenizer.encode("0"):
            raise InvalidRequestError("this tokenizer merges the prompt's context into its frame")
        return a[:head], a[-tail:]

    def _render(self, context: str, needle: Needle) -> list[int]:
        """The whole prompt as the tokenizer encodes it: RULER's instructions, the context,
        the question and, as the answer's start, its opening words."""
        tok = self.tokenizer
        content = f"{INTRO}\n{context}\n{QUESTION.format(key=needle.key)}"
        answer = ANSWER_PREFIX.format(key=needle.key)
        if not self.chat:
            return tok.encode(f"{content} {answer}", bos=True)
        messages = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": answer},
        ]
        return tok.encode_chat(messages, continue_final_message=True)

    def _needle(self, needle: Needle, insert: int) -> list[int]:
        """The needle's tokens before haystack token `insert`: set off from its neighbours by
        a space or a newline where they have none (the frame ends in a newline)."""
        piece = self.tokenizer.token_bytes
        before = piece(self.tokens[insert - 1]) if insert > 0 else b"\n"
        lead = "" if before[-1:].isspace() else " "
        trail = "" if piece(self.tokens[insert])[:1].isspace() else "\n"
        return self.tokenizer.encode(f"{lead}{needle.sentence}{trail}")

    def _grow(self, size: int) -> None:
        """Repeat the corpus, as NIAH harnesses do, when a length needs more tokens."""
        while len(self.tokens) < size:
            start = len(self.tokens)
            self.tokens += self.separator + self.tokens[: self.corpus_tokens]
            self.boundaries += self._find_boundaries(start)

    def _find_boundaries(self, start: int) -> list[int]:
        """Token positions from `start` on where a sentence or a line begins: after a
        newline, before one, or after `.!?` and before whitespace."""
        piece, tokens = self.tokenizer.token_bytes, self.tokens
        found = []
        for i in range(max(start, 1), len(tokens)):
            end, next_start = piece(tokens[i - 1])[-1:], piece(tokens[i])[:1]
            if b"\n" in (end, next_start) or (end in b".!?" and next_start.isspace()):
                found.append(i)
        return found

    def _boundary(self, target: float, size: int) -> int:
        """The sentence boundary nearest `target` in the first `size` tokens (0 and `size`,
        the context's two ends, count as boundaries)."""
        candidates = [0, size]
        i = bisect.bisect_left(self.boundaries, target)
        candidates += [b for b in self.boundaries[max(i - 1, 0) : i + 1] if b < size]
        return min(candidates, key=lambda b: (abs(b - target), b))


def auto_lengths(longest: int) -> list[int]:
    """A geometric series up to `longest`: the powers of two from 1024 (or from an eighth of
    `longest`, for short contexts) below it, and `longest` itself."""
    low = min(1024, max(longest // 8, 1))
    lengths = []
    power = 1 << (low - 1).bit_length()
    while power < longest:
        lengths.append(power)
        power *= 2
    return [*lengths, longest]


def build_grid(
    tokenizer: BaseTokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    *,
    context: int,
    max_tokens: int = MAX_TOKENS,
    samples: int = 1,
    seed: int = 0,
    chat: bool = True,
    haystack: str | None = None,
) -> list[Cell]:
    """The prompts of the grid, `samples` per (length, depth), for a model of `context`
    tokens (each length must leave room for `max_tokens` of answer)."""
    longest = context - max_tokens
    for length in lengths:
        if length > longest:
            raise InvalidRequestError(
                f"length {length} is beyond the model's context: {context} tokens, less "
                f"{max_tokens} for the answer, allow prompts of at most {longest}"
            )
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise InvalidRequestError(f"depth {depth} is not a fraction between 0 and 1")
    stack = Haystack(tokenizer, CORPUS.read_text() if haystack is None else haystack, chat)
    return [
        stack.cell(length, depth, sample, Needle.draw(seed, length, depth, sample))
        for length in lengths
        for depth in depths
        for sample in range(samples)
    ]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def found(answer: str, expected: str) -> bool:
    """The scoring rule: the expected string appears in the answer, case and runs of
    whitespace aside."""
    return normalize(expected) in normalize(answer)


def run_needle(
    llm: LLM,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEPTHS,
    *,
    samples: int = 1,
    seed: int = 0,
    chat: bool = True,
    max_tokens: int = MAX_TOKENS,
    haystack: str | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid on `llm` (greedy answers) and return the report that `save_report`
    writes: scores[depth][length], each prompt's tokens, needle and answer, the settings
    (`settings` adds what the caller loaded the model with) and the seconds taken. By
    default the lengths are `auto_lengths` up to the model's context."""
    if llm.tokenizer is None:
        raise InvalidRequestError("the needle test needs the model's tokenizer")
    context = llm.engine.max_model_len
    lengths = list(lengths or auto_lengths(context - max_tokens))
    cells = build_grid(
        llm.tokenizer,
        lengths,
        depths,
        context=context,
        max_tokens=max_tokens,
        samples=samples,
        seed=seed,
        chat=chat,
        haystack=haystack,
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    answers = _answer_all(llm.engine, cells, params, progress)
    seconds = time.perf_counter() - start
    settings = {
        "dtype": str(llm.model.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(llm.engine.cache.kv_dtype).removeprefix("torch."),
        **(settings or {}),
        "context": context,
        "chat": chat,
        "samples": samples,
        "seed": seed,
        "max_tokens": max_tokens,
        "decoding": "greedy",
    }
    source = "mistral_nemo/eval/data/corpus.txt" if haystack is None else "text given"
    settings["haystack"] = f"{source}, from its start, repeated if a length needs more"
    return _report(str(llm.path), settings, cells, answers, seconds)


def _answer_all(
    engine: Engine, cells: list[Cell], params: SamplingParams, progress: bool
) -> list[str]:
    """Greedy answers to every cell's prompt through the engine, with a progress bar.

    The prompt whose needle sits deepest runs first, alone: its stretch of haystack is the
    longest that the other prompts start with, so it leaves in the prefix cache what they
    share and each of them computes only what follows its own needle (prompts started in
    the same step would each compute the shared part).
    """
    deepest = max(range(len(cells)), key=lambda i: cells[i].needle_span[0])
    rest = [i for i in range(len(cells)) if i != deepest]
    answers: dict[int, str] = {}
    with tqdm(total=len(cells), desc="needle", unit="prompt", disable=not progress) as bar:
        for wave in ([deepest], rest):
            running = {engine.add_request(cells[i].prompt, params): i for i in wave}
            try:
                while running:
                    for out in engine.step():
                        if out.finished:
                            answers[running.pop(out.request_id)] = out.outputs[0].text
                            bar.update()
            finally:
                for request_id in running:
                    engine.abort(request_id)
    return [answers[i] for i in range(len(cells))]


def _report(
    model: str, settings: dict[str, Any], cells: list[Cell], answers: list[str], seconds: float
) -> dict[str, Any]:
    grid: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for cell, answer in zip(cells, answers, strict=True):
        grid.setdefault((cell.length, cell.depth), []).append(
            {
                "key": cell.needle.key,
                "expected": cell.needle.value,
                "answer": answer,
                "found": found(answer, cell.needle.value),
                "prompt_tokens": len(cell.prompt),
                "haystack_tokens": cell.context[1] - cell.context[0],
                "needle_token": cell.needle_span[0],
                "needle_depth": round(cell.needle_depth, 4),
            }
        )
    lengths = list(dict.fromkeys(length for length, _ in grid))
    depths = list(dict.fromkeys(depth for _, depth in grid))
    return {
        "task": "needle in a haystack",
        "model": model,
        "settings": settings,
        "token_count": TOKEN_COUNT,
        "needle": NEEDLE,
        "question": QUESTION,
        "answer_prefix": ANSWER_PREFIX,
        "scoring": "the needle's number appears in the greedy answer (case-insensitive, "
        "whitespace normalized); a cell scores the share of its samples found",
        "lengths": lengths,
        "depths": depths,
        "scores": [[_score(grid[length, depth]) for length in lengths] for depth in depths],
        "mean_score": _score([s for samples in grid.values() for s in samples]),
        "seconds": round(seconds, 2),
        "prompt_tokens": sum(len(c.prompt) for c in cells),
        "cells": [
            {"length": length, "depth": depth, "score": _score(samples), "samples": samples}
            for (length, depth), samples in grid.items()
        ],
    }


def _score(samples: list[dict[str, Any]]) -> float:
    return sum(s["found"] for s in samples) / len(samples)


def save_report(
    report: dict[str, Any], out_dir: str | Path, name: str = "needle"
) -> tuple[Path, Path]:
    """Write `name`.json and the heat map `name`.png into `out_dir`, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    write_json(json_path, report)
    write_atomic(png_path, lambda f: plot_heatmap(report, f))
    return json_path, png_path


def plot_heatmap(report: dict[str, Any], file: str | Path | BinaryIO) -> None:
    """The grid as a PNG: length across, depth down, the score as colour and number."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths, scores = report["lengths"], report["depths"], report["scores"]
    fig = Figure(figsize=(1.3 * len(lengths) + 3, 0.6 * len(depths) + 2.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for y, row in enumerate(scores):
        for x, score in enumerate(row):
            dark = score < 0.2 or score > 0.8  # the colour map's two ends
            colour = "white" if dark else "black"
            ax.text(x, y, f"{score:.0%}", ha="center", va="center", color=colour, fontsize=10)
    fig.colorbar(image, ax=ax, label="needles found", format=lambda v, _: f"{v:.0%}")
    s = report["settings"]
    weights = s.get("quantize") or s["dtype"]
    ax.set_title(
        f"Needle in a haystack: {Path(report['model']).name}\n"
        f"weights {weights}, KV cache {s['kv_cache_dtype']}, "
        f"{'chat' if s['chat'] else 'plain'} prompt, {s['samples']} per cell, greedy; "
        f"mean {report['mean_score']:.0%}, {report['seconds']:.0f} s",
        fontsize=9,
    )
    fig.savefig(file, format="png", dpi=120)
