"""Benchmarks from local JSONL files: log-likelihood multiple choice and generation with
exact-match or regex scoring.

Multiple choice, one question a line, in either of two shapes:
- MMLU-style `{"question": str, "choices": [str, ...], "answer": int | "A".., "subject"?: str}`:
  the prompt lists the lettered choices and ends with "Answer:"; the continuations are the
  letters (" A", " B", ...), as lm-evaluation-harness's MMLU;
- HellaSwag-style `{"context": str, "choices": [str, ...], "answer": int}`: the
  continuations are the choices themselves, after a space.
Generation, `{"prompt": str, "answer": str | [str, ...]}`: greedy, cut at stop strings.
k-shot examples come from a dev file of the same shape, in its order.

Metrics follow lm-evaluation-harness: acc is the share of questions whose right choice has
the highest log-likelihood, acc_norm the same with log-likelihoods divided by each choice's
length in characters; exact_match after lower-casing and collapsing whitespace.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_nemo.engine import LLM
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.loglikelihood import score_continuations
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.tokenizer import BaseTokenizer

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Question:
    context: str  # the prompt, few-shot examples not included
    choices: list[str]  # continuations, without the space that joins them to the context
    answer: int
    subject: str = ""


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    questions: int
    # Per question: the log-likelihood of each choice, and the choice picked by acc.
    loglikelihoods: list[list[float]] = field(default_factory=list)
    picked: list[int] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        hits = [float(p == a) for p, a in zip(self.picked, self.answers, strict=True)]
        return {
            "acc": self.acc,
            "acc_stderr": stderr_of_mean(hits),
            "acc_norm": self.acc_norm,
            "questions": self.questions,
        }


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSONL file with their line numbers (blank lines skipped); a bad line
    raises an error that names the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InvalidRequestError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    if not rows:
        raise InvalidRequestError(f"{path}: no examples")
    return rows


def read_questions(path: str | Path) -> list[Question]:
    return [_question(row, f"{path}:{number}") for number, row in read_jsonl(path)]


def _question(row: dict[str, Any], where: str) -> Question:
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise InvalidRequestError(f"{where}: 'choices' must be a list of two or more strings")
    if not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError(f"{where}: every choice must be a string")
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS[: len(choices)]:
        answer = LETTERS.index(answer)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InvalidRequestError(
            f"{where}: 'answer' must be a choice's index (0..{len(choices) - 1}) or letter"
        )
    if isinstance(row.get("question"), str):  # MMLU-style: lettered choices
        lines = [row["question"].strip()]
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
        context = "\n".join([*lines, "Answer:"])
        return Question(context, list(LETTERS[: len(choices)]), answer, row.get("subject", ""))
    if isinstance(row.get("context"), str):
        return Question(row["context"], choices, answer)
    raise InvalidRequestError(f"{where}: needs a 'question' (MMLU-style) or a 'context' string")


def question_prompt(question: Question, shots: Sequence[Question] = ()) -> str:
    """The context the choices continue: the subject's description and k solved examples
    before the question, as lm-eval's MMLU writes them."""
    head = ""
    if question.subject:
        subject = question.subject.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    solved = "".join(f"{q.context} {q.choices[q.answer]}\n\n" for q in shots)
    return head + solved + question.context


def run_multiple_choice(
    llm: LLM,
    questions: Sequence[Question],
    shots: Sequence[Question] = (),
    progress: bool = False,
) -> ChoiceResult:
    """acc and acc_norm of `questions`, each preceded by the `shots` (all continuations of a
    question scored together, the shared context computed once)."""
    tok = llm.tokenizer
    if tok is None:
        raise InvalidRequestError("multiple choice needs a tokenizer")
    pairs: list[tuple[list[int], list[int]]] = []
    for q in questions:
        context = question_prompt(q, shots)
        for choice in q.choices:
            pairs.append(encode_pair(tok, context, " " + choice))
    scores = score_continuations(llm, pairs, progress)
    result = ChoiceResult(0.0, 0.0, len(questions))
    at = 0
    right = right_norm = 0
    for q in questions:
        lls = [s.logprob for s in scores[at : at + len(q.choices)]]
        at += len(q.choices)
        normed = [ll / len(c) for ll, c in zip(lls, q.choices, strict=True)]
        picked = _argmax(lls)
        right += picked == q.answer
        right_norm += _argmax(normed) == q.answer
        result.loglikelihoods.append(lls)
        result.picked.append(picked)
        result.answers.append(q.answer)
    result.acc, result.acc_norm = right / len(questions), right_norm / len(questions)
    return result


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def encode_pair(tok: BaseTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of context and continuation as lm-eval's causal models split them: trailing
    spaces of the context move to the continuation, and the continuation's ids are those
    of the whole text past the context's; the context starts with BOS, as the model saw
    its training documents (where its tokenizer adds one)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return tok.encode("", bos=True) + ctx, whole[len(ctx) :]


@dataclass(frozen=True)
class GenerationExample:
    prompt: str
    answers: list[str]


@dataclass
class GenerationResult:
    exact_match: float
    examples: int
    outputs: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {"exact_match": self.exact_match, "examples": self.examples}


def read_generation_examples(path: str | Path) -> list[GenerationExample]:
    examples = []
    for number, row in read_jsonl(path):
        prompt, answer = row.get("prompt"), row.get("answer")
        answers = [answer] if isinstance(answer, str) else answer
        if (
            not isinstance(prompt, str)
            or not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise InvalidRequestError(
                f"{path}:{number}: needs 'prompt' (a string) and 'answer' (a string or a list)"
            )
        examples.append(GenerationExample(prompt, [str(a) for a in answers]))
    return examples


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def run_generation(
    llm: LLM,
    examples: Sequence[GenerationExample],
    shots: Sequence[GenerationExample] = (),
    max_tokens: int = 64,
    stop: Sequence[str] = ("\n\n",),
    regex: str | None = None,
) -> GenerationResult:
    """Greedy answers to `examples` (after the `shots`, each "prompt answer\\n\\n"), scored
    by exact match: of the whole answer (stripped, lower-cased, whitespace collapsed), or of
    the first group (else the match) of `regex` searched in it."""
    pattern = re.compile(regex) if regex is not None else None
    prefix = "".join(f"{s.prompt} {s.answers[0]}\n\n" for s in shots)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=list(stop))
    outputs = llm.generate([prefix + e.prompt for e in examples], params)
    result = GenerationResult(0.0, len(examples))
    for example, out in zip(examples, outputs, strict=True):
        text = out.outputs[0].text
        found = _extract(text, pattern)
        ok = found is not None and any(normalize(found) == normalize(a) for a in example.answers)
        result.outputs.append(text)
        result.correct.append(ok)
    result.exact_match = sum(result.correct) / len(examples)
    return result


def _extract(text: str, pattern: re.Pattern[str] | None) -> str | None:
    if pattern is None:
        return text.strip()
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if match.groups() else match.group(0)


def stderr_of_mean(values: Sequence[float]) -> float:
    """Standard error of a mean, as lm-eval reports it for acc."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
