"""Reading tool calls out of what the model generated.

NeMo answers a tool request with `[TOOL_CALLS]` followed by a JSON list of
`{"name": ..., "arguments": {...}, "id": ...}` (the id is often missing), then `</s>`.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mistral_nemo.tokenizer.validation import FUNCTION_NAME, TOOL_CALL_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mistral_nemo.tokenizer.base import BaseTokenizer

_ID_ALPHABET = string.ascii_letters + string.digits
TOOL_CALLS = "[TOOL_CALLS]"


def new_tool_call_id() -> str:
    """A fresh id in the format NeMo's tool results must echo: 9 ASCII letters or digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass
class AssistantOutput:
    """A completion split into its text and its tool calls.

    If the tool-call part is not valid, `tool_calls` is empty, `content` holds the whole
    completion as text and `error` says what was wrong.
    """

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def tool_calls_id(tokenizer: BaseTokenizer) -> int | None:
    """The id of the [TOOL_CALLS] control token; None for a vocabulary without it (a GGUF's
    other BPE tokenizers), whose completions never call tools."""
    return tokenizer.special_ids.get(TOOL_CALLS)


def calls_tools(tokenizer: BaseTokenizer, ids: Sequence[int]) -> bool:
    """Whether a completion has started calling tools: it holds [TOOL_CALLS]."""
    marker = tool_calls_id(tokenizer)
    return marker is not None and marker in ids


def tool_call_answer(tokenizer: BaseTokenizer, ids: Sequence[int]) -> AssistantOutput | None:
    """The answer of a finished completion that calls tools: its text before [TOOL_CALLS]
    and the parsed calls, with ids; its finish reason is then "tool_calls". None when it
    calls none, or when its calls do not parse: its text then stands as it is."""
    if not calls_tools(tokenizer, ids):
        return None
    answer = parse_output(tokenizer, ids)
    return answer if answer.tool_calls else None


def parse_output(tokenizer: BaseTokenizer, ids: Sequence[int]) -> AssistantOutput:
    """Split generated ids at the [TOOL_CALLS] control token and parse the calls after it."""
    marker = tool_calls_id(tokenizer)
    ids = [i for i in ids if i != tokenizer.eos_id]
    if marker is None or marker not in ids:
        return AssistantOutput(tokenizer.decode(ids))
    at = ids.index(marker)
    content = tokenizer.decode(ids[:at])
    blocks = _split(ids[at:], marker)
    try:
        calls = [c for block in blocks for c in parse_tool_calls(tokenizer.decode(block))]
    except ValueError as e:
        text = content + "".join(TOOL_CALLS + tokenizer.decode(b) for b in blocks)
        return AssistantOutput(text, error=str(e))
    return AssistantOutput(content, calls)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """`[{"id", "name", "arguments"}]` from the JSON the model wrote after [TOOL_CALLS];
    `arguments` is a JSON string, as in the OpenAI API. Raises ValueError naming the fault."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())  # trailing text is ignored
    except json.JSONDecodeError as e:
        raise ValueError(f"tool calls are not valid JSON: {e}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("tool calls must be a non-empty JSON list of calls")
    calls = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"tool call {i} has no function name")
        if not FUNCTION_NAME.fullmatch(item["name"]):
            raise ValueError(f"tool call {i}: invalid function name {item['name']!r}")
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"tool call {i}: arguments are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {i}: arguments must be a JSON object")
        call_id = item.get("id")
        if not isinstance(call_id, str) or not TOOL_CALL_ID.fullmatch(call_id):
            call_id = new_tool_call_id()
        calls.append(
            {
                "id": call_id,
                "name": item["name"],
                "arguments": json.dumps(arguments, ensure_ascii=False),
            }
        )
    return calls


def _split(ids: list[int], marker: int) -> list[list[int]]:
    """The runs of ids after each marker."""
    blocks: list[list[int]] = []
    for i in ids:
        if i == marker:
            blocks.append([])
        else:
            blocks[-1].append(i)
    return blocks
