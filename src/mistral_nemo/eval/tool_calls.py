"""Tool-calling accuracy: does the model call the right functions with the right arguments,
and only when a call is needed?

Each item is a conversation in OpenAI's format, `{"tools": [...], "messages": [...]}`
(benchmarks/make_tool_data.py writes them). The prompt is the conversation up to its first
assistant turn; the model answers greedily; the calls of its answer are compared with that
turn's. An item that expects calls is correct when the model made calls that parse, name the
expected functions, validate against the offered tools' JSON schemas and carry the expected
arguments (compared as parsed JSON, strings case-insensitively and stripped; parallel calls in
any order); one that expects none is correct when the model called nothing.

Two chat formats:
- "mistral": NeMo's own (Tekken instruct): the tools go in [AVAILABLE_TOOLS], the calls come
  after [TOOL_CALLS] (`tokenizer.tool_calls.parse_output`).
- "text": for chat templates without tools, such as the demo model's (SmolLM2-135M-Instruct,
  ChatML): tools and calls written as text (`tokenizer.text_tools`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema

from mistral_nemo.engine import LLM
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.tasks import read_jsonl
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.tokenizer import BaseTokenizer
from mistral_nemo.tokenizer.text_tools import call_arguments, parse_text_tool_calls, to_text_tools
from mistral_nemo.tokenizer.tool_calls import AssistantOutput, parse_output

CHAT_FORMATS = ("mistral", "text")
MAX_TOKENS = 256  # room for two calls with long arguments (an email body)


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """The conversations of a JSONL file, one a line."""
    return [row for _, row in read_jsonl(path)]


# --- prompts and answers --------------------------------------------------------------------


def prompt_ids(
    tokenizer: BaseTokenizer, conversation: dict[str, Any], chat_format: str
) -> list[int]:
    """The prompt of an item: the conversation up to its first assistant turn, encoded in
    `chat_format`, ready for the assistant's answer."""
    _check_format(chat_format)
    messages = conversation["messages"]
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if chat_format == "mistral":
        return tokenizer.encode_chat(messages[:first], tools=conversation.get("tools"))
    prefix = {"tools": conversation.get("tools"), "messages": messages[:first]}
    return tokenizer.encode_chat(to_text_tools(prefix)["messages"])


def parse_answer(tokenizer: BaseTokenizer, ids: Sequence[int], chat_format: str) -> AssistantOutput:
    """The text and tool calls of a generated answer in `chat_format`."""
    _check_format(chat_format)
    if chat_format == "mistral":
        return parse_output(tokenizer, ids)
    return parse_text_tool_calls(tokenizer.decode(i for i in ids if i != tokenizer.eos_id))


def _check_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise InvalidRequestError(
            f"chat format {chat_format!r} is not one of {', '.join(CHAT_FORMATS)}"
        )


# --- grading --------------------------------------------------------------------------------


def expected_calls(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls of the first assistant turn, `{"name", "arguments"}` with arguments parsed;
    empty when that turn answers in text."""
    first = next(m for m in conversation["messages"] if m["role"] == "assistant")
    return [
        {"name": c["function"]["name"], "arguments": call_arguments(c["function"])}
        for c in first.get("tool_calls") or []
    ]


def grade(conversation: dict[str, Any], answer: AssistantOutput) -> dict[str, Any]:
    """How one answer fares against the conversation's first assistant turn."""
    expected = expected_calls(conversation)
    made = [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in answer.tool_calls]
    schemas = {
        t["function"]["name"]: t["function"].get("parameters") or {}
        for t in conversation.get("tools") or []
    }
    called = bool(made) or answer.error is not None  # a call that fails to parse is a call
    parsed = bool(made) and answer.error is None
    names_match = parsed and _names(made) == _names(expected)
    schema_valid = parsed and all(
        c["name"] in schemas
        and jsonschema.Draft7Validator(schemas[c["name"]]).is_valid(c["arguments"])
        for c in made
    )
    arguments_match = parsed and _as_multiset(made) == _as_multiset(expected)
    return {
        "expected": expected,
        "calls": made,
        "content": answer.content,
        "error": answer.error,
        "call_expected": bool(expected),
        "called": called,
        "parsed": parsed,
        "names_match": names_match,
        "schema_valid": schema_valid,
        "arguments_match": arguments_match,
        "correct": schema_valid and arguments_match if expected else not called,
    }


def _names(calls: list[dict[str, Any]]) -> Counter[str]:
    return Counter(c["name"] for c in calls)


def _as_multiset(calls: list[dict[str, Any]]) -> Counter[str]:
    """Calls as comparable keys: the same calls in any order give the same multiset."""
    return Counter(
        json.dumps([c["name"], _normalized(c["arguments"])], sort_keys=True) for c in calls
    )


def _normalized(value: Any) -> Any:
    """Strings stripped and case-folded, at any depth; numbers compare as numbers (2 == 2.0),
    but a boolean stays apart from 0 and 1."""
    if isinstance(value, str):
        return value.strip().casefold()
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    return value


def summarize(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The share of items fully correct, the partial rates, and the items themselves.

    The call rates (called, parsed, names, schema, arguments) are over the items that expect
    calls; `no_call_accuracy` is over those that expect none. A rate with no items is None.
    """
    call_items = [i for i in items if i["call_expected"]]
    no_call_items = [i for i in items if not i["call_expected"]]

    def rate(key: str, over: Sequence[dict[str, Any]]) -> float | None:
        return sum(bool(i[key]) for i in over) / len(over) if over else None

    return {
        "items": len(items),
        "call_items": len(call_items),
        "no_call_items": len(no_call_items),
        "accuracy": rate("correct", items),
        "call_rate": rate("called", call_items),
        "parse_rate": rate("parsed", call_items),
        "name_accuracy": rate("names_match", call_items),
        "schema_valid_rate": rate("schema_valid", call_items),
        "arguments_accuracy": rate("arguments_match", call_items),
        "no_call_accuracy": rate("correct", no_call_items),
        "details": list(items),
    }


def score_tool_calls(
    llm: LLM,
    conversations: Sequence[dict[str, Any]],
    chat_format: str,
    max_tokens: int = MAX_TOKENS,
) -> dict[str, Any]:
    """Generate an answer greedily for every conversation (one batch through the engine)
    and grade it; `summarize`'s report, with the chat format."""
    if llm.tokenizer is None:
        raise InvalidRequestError("scoring tool calls needs the model's tokenizer")
    tokenizer = llm.tokenizer
    prompts = [prompt_ids(tokenizer, c, chat_format) for c in conversations]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    items = []
    for conversation, output in zip(conversations, outputs, strict=True):
        completion = output.outputs[0]
        item = grade(conversation, parse_answer(tokenizer, completion.token_ids, chat_format))
        items.append({**item, "output": completion.text})
    return {"chat_format": chat_format, **summarize(items)}
