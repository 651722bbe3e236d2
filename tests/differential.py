"""Differential testing against mistral-common 1.13.1: generated conversations and texts go
through ours and the reference, which must take the same decision (accept or reject) and,
when they accept, produce the same ids.

Shared by the CI test (`tests/test_differential.py`, a few thousand derandomized examples)
and the long run (`benchmarks/differential.py`).
"""

from __future__ import annotations

import copy
import json
import re
import string
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from mistral_nemo import InvalidRequestError
from mistral_nemo.tokenizer import Tokenizer

# Where we are deliberately stricter than mistral-common: the conversations it encodes and we
# refuse, by the rule our error names. Nothing else may differ.
STRICTER = {
    # NeMo was trained with every call answered; mistral-common only checks that results
    # follow calls. An unanswered call would have the model see a call with no outcome.
    "every tool call needs its result": re.compile(r"has no tool result"),
    # Ids are the model's way to pair results with calls; a repeated id pairs two calls.
    "tool call ids are unique": re.compile(r"tool call id .* is used twice"),
    # A result must answer a call of the assistant turn before it (mistral-common accepts
    # any id of the right shape).
    "a result answers a call": re.compile(r"answers no pending tool call"),
    # Two tools of one name make a call to it ambiguous.
    "tool names are unique": re.compile(r"function .* is defined twice"),
    # What the model continues is text; continuing a turn of tool calls has no meaning.
    "continue_final_message continues text": re.compile(r"cannot continue tool calls"),
}

ALNUM = string.ascii_letters + string.digits
NAMES = ["get_weather", "web_search", "send-email", "f"]


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    params = parameters or {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    }
    return {
        "type": "function",
        "function": {"name": name, "description": f"the {name} tool", "parameters": params},
    }


text = st.text(max_size=24)
# Text that may look like the format: control-token names, JSON, whitespace.
tricky = st.one_of(
    text,
    st.sampled_from(
        ["[INST]", "[/INST]", "</s>", "<s>", "[TOOL_CALLS]", "[TOOL_RESULTS]", "\n\n", " ", "{}"]
    ),
)
content = st.one_of(
    tricky,
    st.just(""),
    st.none(),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": tricky}), max_size=3),
    st.just([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
)
call_id = st.one_of(
    st.text(ALNUM, min_size=9, max_size=9),
    st.text(ALNUM, max_size=12),
    st.sampled_from(["call_1234", "abc-12345", "ééééééééé", "null"]),
)
json_value = st.one_of(st.integers(-5, 5), st.text(max_size=6), st.booleans(), st.none())
arguments = st.one_of(
    st.dictionaries(st.sampled_from(["city", "days", "x"]), json_value, max_size=3),
    st.dictionaries(st.sampled_from(["city", "days"]), json_value, max_size=2).map(json.dumps),
    st.sampled_from(["{bad json", "[]", "null", '"text"', ""]),
)
tool_call = st.fixed_dictionaries(
    {
        "id": call_id,
        "type": st.sampled_from(["function", "function", "function", "other"]),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from([*NAMES, "bad name!", ""]), "arguments": arguments}
        ),
    }
)
tools = st.one_of(
    st.none(),
    st.just([]),
    st.lists(st.sampled_from(NAMES).map(_tool), min_size=1, max_size=3),
    st.sampled_from(
        [
            [_tool("bad name!")],
            [_tool("get_weather"), _tool("get_weather")],
            [_tool("f", {"type": "object", "properties": {"a": {"type": "no-such-type"}}})],
            [{"type": "function", "function": {"name": "f"}}],
        ]
    ),
)


@st.composite
def message(draw: st.DrawFn, role: str | None = None) -> dict[str, Any]:
    role = role or draw(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))
    m: dict[str, Any] = {"role": role, "content": draw(content)}
    if role == "assistant" and draw(st.booleans()):
        m["tool_calls"] = draw(st.lists(tool_call, min_size=1, max_size=2))
    if role == "tool":
        m["tool_call_id"] = draw(call_id)
        if draw(st.booleans()):
            m["name"] = draw(st.sampled_from(NAMES))
    return m


@st.composite
def plausible(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A conversation in a plausible order, calls answered by their ids, then perhaps
    mutated: most are valid, so acceptance is exercised as much as refusal."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(tricky)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(st.one_of(tricky, content))})
        if draw(st.booleans()):
            ids = draw(st.lists(st.text(ALNUM, min_size=9, max_size=9), min_size=1, max_size=2))
            calls = [
                {
                    "id": i,
                    "type": "function",
                    "function": {"name": draw(st.sampled_from(NAMES)), "arguments": {"city": "P"}},
                }
                for i in ids
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": i, "content": draw(text)} for i in ids]
        if draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(tricky)})
    if draw(st.integers(0, 3)) == 0:  # one mutation
        at = draw(st.integers(0, len(messages)))
        if draw(st.booleans()) and messages:
            messages[min(at, len(messages) - 1)] = draw(message())
        else:
            messages.insert(at, draw(message()))
    return messages


# Mostly plausible ones: a random list of messages is nearly always refused by both.
conversations = st.one_of(plausible(), plausible(), plausible(), st.lists(message(), max_size=5))


@dataclass
class Outcome:
    ids: list[int] | None
    error: str | None


def ours(tok: Tokenizer, messages: Any, tools: Any, cont: bool) -> Outcome:
    try:
        return Outcome(tok.encode_chat(copy.deepcopy(messages), tools, cont), None)
    except InvalidRequestError as e:
        return Outcome(None, str(e))


def reference(ref: Any, messages: Any, tools: Any, cont: bool) -> Outcome:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    try:
        request = ChatCompletionRequest.from_openai(
            messages=copy.deepcopy(messages),
            tools=copy.deepcopy(tools),
            continue_final_message=cont,
        )
        return Outcome(ref.encode_chat_completion(request).tokens, None)
    except Exception as e:  # any refusal: pydantic, validation, template errors
        return Outcome(None, f"{type(e).__name__}: {e}")


def stricter_rule(error: str | None) -> str | None:
    """The name of the deliberate rule an error of ours is, if any."""
    for name, pattern in STRICTER.items():
        if error is not None and pattern.search(error):
            return name
    return None


def disagreement(tok: Tokenizer, ref: Any, messages: Any, tools: Any, cont: bool) -> str | None:
    """Why ours and the reference disagree on this request, or None."""
    a, b = ours(tok, messages, tools, cont), reference(ref, messages, tools, cont)
    if a.ids is not None and b.ids is not None:
        return None if a.ids == b.ids else "both accept with different ids"
    if a.ids is None and b.ids is None:
        return None
    if a.ids is None and stricter_rule(a.error):
        return None
    if a.ids is None:
        return f"we reject ({a.error}); mistral-common accepts"
    return f"we accept; mistral-common rejects ({b.error})"


# -- Tekken on text --------------------------------------------------------------------

# Arbitrary unicode, lone surrogates (which UTF-8 cannot encode), control-token look-alikes.
tekken_text = st.one_of(
    st.text(st.characters(codec=None), max_size=64),
    st.text(st.characters(categories=["Cs", "L", "Zs"]), max_size=16),
    st.lists(
        st.sampled_from(["[INST]", "</s>", "<s>", "<unk>", "[TOOL_CALLS]", "<SPECIAL_20>", "a"]),
        max_size=6,
    ).map("".join),
)


def tekken_disagreement(tok: Tokenizer, ref: Any, text_in: str) -> str | None:
    """Ours and mistral-common's Tekkenizer on one text: encode, and decode back."""
    try:
        expected = ref.encode(text_in, bos=True, eos=False)
    except Exception as e:
        expected = e
    try:
        got = tok.encode(text_in, bos=True)
    except Exception as e:
        got = e
    if isinstance(expected, Exception) or isinstance(got, Exception):
        same = type(got) is type(expected) or (
            isinstance(got, UnicodeError) and isinstance(expected, UnicodeError)
        )
        return None if same else f"encode: ours {got!r}, mistral-common {expected!r}"
    if got != expected:
        return "encode: different ids"
    if tok.decode(got) != ref.decode(expected):
        return "decode: different text"
    return None
