"""Structured outputs on random weights (the worst case): whatever the model would say, the
completion matches the JSON schema, regex, choice or tool schemas it was held to."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from mistral_nemo import LLM, Transformer
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.structured import Guidance, tool_calls_guidance
from mistral_nemo.tokenizer import Tokenizer
from mistral_nemo.tokenizer.tool_calls import tool_call_answer

# Nested objects, an enum, an array with bounds, numeric ranges, a pattern.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"enum": ["celsius", "fahrenheit"]},
        "when": {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["city", "days", "units", "when", "tags", "ratio"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {
            "name": "send",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string", "maxLength": 12},
                    "urgent": {"type": "boolean"},
                },
                "required": ["to", "urgent"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def llm(tiny_mistral):
    model = Transformer.from_pretrained(tiny_mistral)
    return LLM(model, Tokenizer.from_pretrained(tiny_mistral), kv_cache_memory="64MiB")


def sampled(llm: LLM, guided: Guidance, n: int, max_tokens: int = 400) -> list:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=3, n=n, guided=guided)
    return llm.generate(["Answer:"], params)[0].outputs


def test_json_schema_output_always_validates(llm):
    outputs = sampled(llm, Guidance(json_schema=SCHEMA), n=12)
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outputs}) > 1  # sampled, not one forced answer


def test_any_json_object(llm):
    for out in sampled(llm, Guidance(json_object=True), n=4, max_tokens=200):
        if out.finish_reason == "stop":  # an unbounded object may run out of tokens
            assert isinstance(json.loads(out.text), dict)


def test_regex_and_choice(llm):
    for out in sampled(llm, Guidance(regex=r"[A-Z][a-z]{2,5}-[0-9]{3}"), n=4):
        assert re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", out.text)
    choices = ("yes", "no", "maybe later")
    assert {o.text for o in sampled(llm, Guidance(choice=choices), n=6)} <= set(choices)


def check_calls(llm: LLM, out, name: str | None = None) -> int:
    """Assert that a completion is valid calls of TOOLS (of `name` if given); their count."""
    answer = tool_call_answer(llm.tokenizer, out.token_ids)
    assert answer is not None, out.text
    for call in answer.tool_calls:
        assert name in (None, call["name"])
        tool = next(t for t in TOOLS if t["function"]["name"] == call["name"])
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
    return len(answer.tool_calls)


@pytest.mark.parametrize("name", [None, "send"])
def test_required_tool_call_parses_and_validates(llm, name):
    for out in sampled(llm, tool_calls_guidance(TOOLS, name, parallel=False), n=10):
        assert out.finish_reason == "stop"
        assert check_calls(llm, out, name) == 1


def test_parallel_calls_validate(llm):
    """Random weights may keep adding calls until max_tokens; the finished ones are valid."""
    outputs = sampled(llm, tool_calls_guidance(TOOLS), n=10, max_tokens=600)
    finished = [o for o in outputs if o.finish_reason == "stop"]
    assert finished
    assert all(check_calls(llm, o) >= 1 for o in finished)


def test_auto_allows_text_and_holds_calls_to_the_schemas(llm):
    for out in sampled(llm, tool_calls_guidance(TOOLS, parallel=False, text=True), n=10):
        if llm.tokenizer.control_id("[TOOL_CALLS]") in out.token_ids:
            check_calls(llm, out)


@pytest.mark.parametrize(
    "guided, message",
    [
        (
            lambda: Guidance(
                json_schema={"type": "object", "properties": {"a": {"type": "bogus"}}}
            ),
            "bogus",
        ),
        (lambda: Guidance(regex="(unclosed"), "invalid constraint"),
        (lambda: Guidance(grammar="start: undefined_rule"), "invalid constraint"),
        (lambda: Guidance(regex="a", choice=("b",)), "exactly one"),
        (lambda: Guidance(choice=()), "at least one"),
    ],
)
def test_bad_constraints_are_refused_by_name(llm, guided, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(["x"], SamplingParams(max_tokens=5, guided=guided()))


def test_tools_on_a_model_without_tool_calls():
    """The demo model's chat format has no tools: the server describes them in the system
    prompt and holds the answer to a `<tool_call>` block, returned in OpenAI's shape."""
    from fastapi.testclient import TestClient

    from mistral_nemo.demo import demo_model_path
    from mistral_nemo.server import create_app

    llm = LLM(demo_model_path(), kv_cache_memory="64MiB")
    tool = {"type": "function", "function": {"name": "weather", "parameters": SCHEMA}}
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "What is the weather in Paris for 3 days?"}],
        "tools": [tool],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 200,
        "temperature": 0,
    }
    with TestClient(create_app(llm, "demo")) as client:
        reply = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        none = client.post(
            "/v1/chat/completions", json={**body, "tool_choice": "none", "max_tokens": 24}
        )
    assert reply["finish_reason"] == "tool_calls", reply
    (call,) = reply["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and len(call["id"]) == 9
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    assert none.json()["choices"][0]["finish_reason"] != "tool_calls"


def test_text_tool_calls_read_whole_json_blocks():
    """A string argument may hold the closing tag: the block's JSON is read whole."""
    from mistral_nemo.tokenizer.text_tools import parse_text_tool_calls

    args = {"note": "done}}]</tool_call> really"}
    text = f'<tool_call>[{{"name": "f", "arguments": {json.dumps(args)}}}]</tool_call> bye'
    answer = parse_text_tool_calls(text)
    assert [json.loads(c["arguments"]) for c in answer.tool_calls] == [args]
    assert answer.content == "bye"
