"""Tools for chat formats that have none: the tools described in the system prompt, the
calls written as text, `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.

This is the convention SmolLM2-Instruct learned function calling in (from Argilla's
Synth-APIGen data; the system prompt of its card's function-calling instructions, which
ollama's smollm2 template carries): the tools as a JSON list inside `<tools>...</tools>` in
the system prompt, the calls in `<tool_call>` blocks, each tool result as a user turn inside
`<tool_response>...</tool_response>` (as ollama's template renders tool messages). The
instructions around the tools are worded here, not copied. Where that prompt asks for an
empty list when no function fits, our answers are plain text; an answer of
`<tool_call>[]</tool_call>` still reads as calling nothing. The server offers it to every
model whose vocabulary has no [TOOL_CALLS], as llama.cpp offers a generic tool format.
"""

from __future__ import annotations

import json
from typing import Any

from mistral_nemo.tokenizer.tool_calls import AssistantOutput, parse_tool_calls

TEXT_TOOLS_PROMPT = (
    "You can call functions to answer the user. The functions, as a JSON list:\n"
    "<tools>{tools}</tools>\n\n"
    "To call one or more of them, answer with only the list of calls, with arguments of the "
    "types the schemas give, in this form:\n"
    '<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]'
    "</tool_call>\n"
    "If none of the functions fits the request, answer in plain text and call nothing."
)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def to_text_tools(conversation: dict[str, Any]) -> dict[str, Any]:
    """The conversation for a chat template without tools: `{"messages": [...]}` with only
    system, user and assistant turns of text. The tools go into the system prompt (before
    the conversation's own system text), tool calls into the assistant's text, tool results
    into user turns. A pure function: the input is left as it is."""
    tools = conversation.get("tools") or []
    system = [m["content"] for m in conversation["messages"] if m["role"] == "system"]
    if tools:
        listed = json.dumps(tools, ensure_ascii=False)
        system.insert(0, TEXT_TOOLS_PROMPT.format(tools=listed))
    messages = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for message in conversation["messages"]:
        role = message["role"]
        if role == "tool":
            response = f"<tool_response>\n{message['content']}\n</tool_response>"
            messages.append({"role": "user", "content": response})
        elif role == "assistant":
            messages.append({"role": "assistant", "content": _assistant_text(message)})
        elif role == "user":
            messages.append({"role": "user", "content": message["content"]})
    return {"messages": messages}


def _assistant_text(message: dict[str, Any]) -> str:
    calls = [
        {"name": c["function"]["name"], "arguments": call_arguments(c["function"])}
        for c in message.get("tool_calls") or []
    ]
    parts = [message.get("content") or ""]
    if calls:
        parts.append(f"<tool_call>{json.dumps(calls, ensure_ascii=False)}</tool_call>")
    return "\n".join(p for p in parts if p)


def call_arguments(function: dict[str, Any]) -> Any:
    """The arguments of an OpenAI tool call's function, parsed (they come as a JSON string)."""
    arguments = function.get("arguments") or {}
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def parse_text_tool_calls(text: str) -> AssistantOutput:
    """The calls in `<tool_call>` blocks of a completion and the text around them. Each
    block's JSON is read whole, so a string argument may hold `</tool_call>` itself; a
    missing closing tag (the token limit cut it) is tolerated. A block that does not parse
    leaves the whole completion as content, with `error` saying why, as `parse_output`
    does."""
    calls: list[dict[str, Any]] = []
    content, at = [], 0
    while (start := text.find(TOOL_CALL_OPEN, at)) >= 0:
        content.append(text[at:start])
        begin = _skip_space(text, start + len(TOOL_CALL_OPEN))
        try:
            value, end = json.JSONDecoder().raw_decode(text, begin)
            if value != []:  # the convention's way of calling nothing
                calls += parse_tool_calls(text[begin:end])
        except json.JSONDecodeError as e:
            return AssistantOutput(text, error=f"tool calls are not valid JSON: {e}")
        except ValueError as e:
            return AssistantOutput(text, error=str(e))
        after = _skip_space(text, end)
        at = after + len(TOOL_CALL_CLOSE) if text.startswith(TOOL_CALL_CLOSE, after) else end
    content.append(text[at:])
    return AssistantOutput("".join(content).strip(), calls)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i
