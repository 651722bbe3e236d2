"""The NeMo instruct format (Mistral's instruct V3 with Tekken): chat and tools to token ids.

    <s>[INST]user[/INST]answer</s>[AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS][INST]system

    user[/INST][TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]</s>
    [TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]answer</s>

Rules, as mistral-common encodes them: the system prompt is prepended to the last user
message; the tool list stands just before the last [INST]; consecutive messages of one role
are merged with blank lines; every text segment is tokenized on its own (BPE never merges
across a control token); JSON is written with `json.dumps(..., ensure_ascii=False)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mistral_nemo.tokenizer.base import BaseTokenizer
from mistral_nemo.tokenizer.validation import role_of, text_of, validate_request


@dataclass
class _Turn:
    role: str
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    call_id: str = ""
    prefix: bool = False


def encode_chat(
    tokenizer: BaseTokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
) -> list[int]:
    """Token ids of a chat request in OpenAI message format, ready for generation.

    With `continue_final_message` the last (assistant) message is left open, without
    </s>, so that generation continues it.
    """
    validate_request(messages, tools, continue_final_message)
    system, turns = _normalize(messages, continue_final_message)
    tok = tokenizer
    ids = [tok.bos_id]
    last_user = max(i for i, t in enumerate(turns) if t.role == "user")
    for i, turn in enumerate(turns):
        if turn.role == "user":
            if i == last_user and tools:
                ids += [
                    tok.control_id("[AVAILABLE_TOOLS]"),
                    *tok.encode(_dumps([_tool_json(t) for t in tools])),
                    tok.control_id("[/AVAILABLE_TOOLS]"),
                ]
            text = f"{system}\n\n{turn.text}" if i == last_user and system else turn.text
            ids += [tok.control_id("[INST]"), *tok.encode(text), tok.control_id("[/INST]")]
        elif turn.role == "assistant":
            if turn.tool_calls:
                ids += [tok.control_id("[TOOL_CALLS]"), *tok.encode(_dumps(turn.tool_calls))]
            else:
                ids += tok.encode(turn.text.rstrip(" "))
            if not turn.prefix:
                ids.append(tok.eos_id)
        else:  # tool result
            result = {"content": _json_or_text(turn.text), "call_id": turn.call_id}
            ids += [
                tok.control_id("[TOOL_RESULTS]"),
                *tok.encode(_dumps(result)),
                tok.control_id("[/TOOL_RESULTS]"),
            ]
    return ids


def _normalize(messages: Sequence[dict[str, Any]], continue_final: bool) -> tuple[str, list[_Turn]]:
    """System prompt, and turns with runs of same-role user/assistant messages merged."""
    system_texts = []
    turns: list[_Turn] = []
    previous = None
    for i, m in enumerate(messages):
        role, text = role_of(m), text_of(m.get("content"), f"messages[{i}].content")
        if role == "system":
            # As mistral-common: an empty string or list adds nothing, a list of empty text
            # parts adds an empty part.
            if text or (isinstance(m.get("content"), list) and m["content"]):
                system_texts.append(text)
        elif role == "tool":
            turns.append(_Turn("tool", text, call_id=m["tool_call_id"]))
        elif role == previous and turns:  # a user or assistant run continues
            merged = turns[-1]
            merged.text = "\n\n".join(t for t in (merged.text, text) if t)
            merged.tool_calls += _calls(m)
        else:
            turns.append(_Turn(role, text, _calls(m)))
        previous = role
    if continue_final:
        turns[-1].prefix = True
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user"))
    return "\n\n".join(system_texts), turns


def _calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls in the encoded shape (other roles carry none)."""
    if message["role"] != "assistant":
        return []
    out = []
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        arguments = fn.get("arguments", "")
        if isinstance(arguments, str):
            arguments = _json_or_text(arguments)
        out.append({"name": fn["name"], "arguments": arguments, "id": call["id"]})
    return out


def _tool_json(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    return {
        "type": "function",
        "function": {
            "name": fn["name"],
            "description": fn.get("description") or "",
            "parameters": fn.get("parameters") or {},
        },
    }


def _json_or_text(text: str) -> Any:
    """Parsed JSON when the text is JSON ("" counts as {}), else the text itself."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
