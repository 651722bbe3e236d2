"""The rules a NeMo chat request must follow, checked before encoding.

They are mistral-common's for NeMo (instruct V3), made stricter where the model's format
needs it (every tool call answered by a tool result with its id), plus the API's limit of
128 tools per request. Each error names the offending message or tool and the rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mistral_nemo.errors import InvalidRequestError

MAX_TOOLS = 128
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ROLES = ("system", "user", "assistant", "tool", "developer")
# Which roles may follow which (mistral-common's order rules for NeMo).
NEXT_ROLES = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"assistant", "user", "tool"},
    "tool": {"assistant", "tool", "user"},
}


def role_of(message: dict[str, Any]) -> str:
    """A message's role; OpenAI's newer "developer" is a system message, as mistral-common
    reads it."""
    return "system" if message["role"] == "developer" else message["role"]


def fail(param: str, rule: str) -> InvalidRequestError:
    err = InvalidRequestError(f"{param}: {rule}")
    err.param = param  # type: ignore[attr-defined]
    return err


def text_of(content: Any, param: str) -> str:
    """A message's text: a string, or OpenAI content parts of type text joined by blank lines."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise fail(f"{param}[{j}]", "only text content parts are supported by NeMo")
            if not isinstance(part.get("text"), str):
                raise fail(f"{param}[{j}].text", "must be a string")
            texts.append(part["text"])
        return "\n\n".join(t for t in texts if t)  # empty parts add nothing
    raise fail(
        param, f"content must be a string or a list of text parts, got {type(content).__name__}"
    )


def validate_request(
    messages: Sequence[Any], tools: Sequence[Any] | None, continue_final_message: bool = False
) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise fail("messages", "must be a list of message objects")
    if not messages:
        raise fail("messages", "the conversation is empty; send at least one message")
    validate_tools(tools)
    for i, message in enumerate(messages):
        _validate_message(message, i)
    roles = [role_of(m) for m in messages]
    if len(roles) == 1 and roles[0] not in ("user", "system"):
        raise fail(
            "messages[0]",
            f"a conversation of one message must be a user or system message, not {roles[0]}",
        )
    for i in range(1, len(roles)):
        if roles[i] not in NEXT_ROLES[roles[i - 1]]:
            raise fail(
                f"messages[{i}]", f"a {roles[i]} message cannot follow a {roles[i - 1]} message"
            )
    last = len(roles) - 1
    if continue_final_message:
        if roles[last] != "assistant":
            raise fail(
                f"messages[{last}]",
                "continue_final_message needs the last message to be an assistant message",
            )
        if messages[last].get("tool_calls"):
            raise fail(f"messages[{last}]", "continue_final_message cannot continue tool calls")
    elif roles[last] == "assistant" and len(roles) > 1:
        raise fail(
            f"messages[{last}]",
            "the last message must be a user or tool message "
            "(or an assistant message to continue, with continue_final_message)",
        )
    _validate_assistant_runs(messages, roles)
    _validate_tool_results(messages)


def _validate_assistant_runs(messages: Sequence[dict[str, Any]], roles: list[str]) -> None:
    """Consecutive assistant messages are merged into one turn, which again must have
    content or tool calls, and not both."""
    first: int | None = None  # the first message of the current assistant run
    has_text = has_calls = False
    for i, role in enumerate([*roles, "end"]):
        if role != "assistant":
            if first is not None and not (has_text or has_calls):
                raise fail(
                    f"messages[{first}]", "the assistant's turn has no text and no tool calls"
                )
            first = None
            continue
        if first is None:
            first, has_text, has_calls = i, False, False
        has_text |= bool(text_of(messages[i].get("content"), f"messages[{i}].content"))
        has_calls |= bool(messages[i].get("tool_calls"))
        if has_text and has_calls:
            raise fail(
                f"messages[{i}]",
                "consecutive assistant messages are merged into one turn, which cannot have "
                "both content and tool_calls",
            )


def validate_tools(tools: Sequence[Any] | None) -> None:
    if tools is None:
        return
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise fail("tools", "must be a list of tool objects")
    if len(tools) > MAX_TOOLS:
        raise fail("tools", f"{len(tools)} tools given; at most {MAX_TOOLS} are allowed")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise fail(param, 'a tool must be {"type": "function", "function": {...}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise fail(f"{param}.function", "must be an object with name and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise fail(
                f"{param}.function.name",
                f"function name {name!r} must be 1 to 64 letters, digits, underscores or dashes",
            )
        if name in names:
            raise fail(f"{param}.function.name", f"function {name!r} is defined twice")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise fail(f"{param}.function.description", "must be a string")
        _check_schema(function.get("parameters"), f"{param}.function.parameters")


def _check_schema(schema: Any, param: str) -> None:
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise fail(param, "must be a JSON Schema object")
    import jsonschema

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise fail(param, f"not a valid JSON Schema: {e.message}") from None


def _validate_message(message: Any, i: int) -> None:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise fail(param, "must be an object with a role")
    role = message.get("role")
    if role not in ROLES:
        raise fail(f"{param}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    text = text_of(message.get("content"), f"{param}.content")
    if role in ("system", "developer", "user", "tool") and message.get("content") is None:
        raise fail(f"{param}.content", f"a {role} message must have content")
    if role == "assistant":
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise fail(f"{param}.tool_calls", "must be a list")
        # A list of text parts counts as content even when its text is empty, as in
        # mistral-common; the merged turn must then have text or calls (below).
        content = message.get("content")
        if bool(text or (isinstance(content, list) and content)) == bool(calls):
            raise fail(
                param,
                "an assistant message must have either content or tool_calls, "
                "not both and not neither",
            )
        for j, call in enumerate(calls):
            _validate_tool_call(call, f"{param}.tool_calls[{j}]")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id is None:
            raise fail(f"{param}.tool_call_id", "a tool message must name the tool call it answers")
        _check_call_id(call_id, f"{param}.tool_call_id")
        name = message.get("name")
        if name is not None and (not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name)):
            raise fail(
                f"{param}.name",
                f"function name {name!r} must be 1 to 64 letters, digits, underscores or dashes",
            )


def _validate_tool_call(call: Any, param: str) -> None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise fail(
            param,
            'a tool call must be {"id", "type": "function", "function": {"name", "arguments"}}',
        )
    _check_call_id(call.get("id"), f"{param}.id")
    name = call["function"].get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise fail(
            f"{param}.function.name",
            f"function name {name!r} must be 1 to 64 letters, digits, underscores or dashes",
        )
    arguments = call["function"].get("arguments", "")
    if not isinstance(arguments, str | dict):
        raise fail(f"{param}.function.arguments", "must be a JSON string or an object")


def _check_call_id(call_id: Any, param: str) -> None:
    if not isinstance(call_id, str) or not TOOL_CALL_ID.fullmatch(call_id):
        raise fail(param, f"tool call id {call_id!r} must be exactly 9 ASCII letters or digits")


def _validate_tool_results(messages: Sequence[dict[str, Any]]) -> None:
    """Every tool call is answered by one tool message with its id, right after the call."""
    pending: dict[str, int] = {}
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message["tool_call_id"]
            if call_id not in pending:
                raise fail(
                    f"messages[{i}].tool_call_id",
                    f"tool result {call_id!r} answers no pending tool call",
                )
            del pending[call_id]
            continue
        if pending:
            call_id, at = next(iter(pending.items()))
            raise fail(
                f"messages[{at}]", f"tool call {call_id!r} has no tool result before messages[{i}]"
            )
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                if call["id"] in pending:
                    raise fail(f"messages[{i}]", f"tool call id {call['id']!r} is used twice")
                pending[call["id"]] = i
    if pending:
        call_id, at = next(iter(pending.items()))
        raise fail(f"messages[{at}]", f"tool call {call_id!r} has no tool result")
