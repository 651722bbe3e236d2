"""Parsing NeMo's tool-call output: `[TOOL_CALLS][{"name", "arguments", "id"?}]</s>`."""

import json

import pytest

from mistral_nemo.tokenizer import Tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file
from mistral_nemo.tokenizer.tool_calls import new_tool_call_id, parse_output, parse_tool_calls
from mistral_nemo.tokenizer.validation import TOOL_CALL_ID


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


def completion(tok, text_before, calls_json, eos=True):
    ids = tok.encode(text_before) + [tok.control_id("[TOOL_CALLS]")] + tok.encode(calls_json)
    return ids + [tok.eos_id] * eos


def test_plain_text_has_no_calls(tok):
    out = parse_output(tok, tok.encode("Just an answer.") + [tok.eos_id])
    assert out.content == "Just an answer." and out.tool_calls == [] and out.error is None


def test_calls_keep_valid_ids_and_get_new_ones_otherwise(tok):
    text = json.dumps(
        [
            {"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "abcDEF123"},
            {"name": "get_weather", "arguments": {"city": "東京"}},
            {"name": "now", "arguments": {}, "id": "bad id"},
        ],
        ensure_ascii=False,
    )
    out = parse_output(tok, completion(tok, "", text))
    assert out.error is None and out.content == ""
    assert [c["name"] for c in out.tool_calls] == ["get_weather", "get_weather", "now"]
    assert out.tool_calls[0]["id"] == "abcDEF123"
    assert all(TOOL_CALL_ID.fullmatch(c["id"]) for c in out.tool_calls)
    assert json.loads(out.tool_calls[1]["arguments"]) == {"city": "東京"}
    assert out.tool_calls[1]["arguments"] == '{"city": "東京"}'  # a JSON string, as in OpenAI


def test_text_before_the_calls_is_content(tok):
    out = parse_output(tok, completion(tok, "Let me check.", '[{"name": "f", "arguments": {}}]'))
    assert out.content == "Let me check." and len(out.tool_calls) == 1


def test_string_arguments_and_single_object(tok):
    calls = parse_tool_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert json.loads(calls[0]["arguments"]) == {"a": 1}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('[{"name": "f", "arguments": {', "not valid JSON"),
        ("[]", "non-empty"),
        ('[{"arguments": {}}]', "no function name"),
        ('[{"name": "f", "arguments": [1, 2]}]', "must be a JSON object"),
        ('[{"name": "f", "arguments": "{oops"}]', "arguments are not valid JSON"),
        ('[{"name": "bad name!", "arguments": {}}]', "invalid function name"),
        ('"just a string"', "non-empty JSON list"),
    ],
)
def test_malformed_calls_fall_back_to_text(tok, bad, reason):
    out = parse_output(tok, completion(tok, "Hm. ", bad))
    assert out.tool_calls == []
    assert reason in out.error
    assert out.content == "Hm. [TOOL_CALLS]" + bad
    with pytest.raises(ValueError, match=reason):
        parse_tool_calls(bad)


def test_generation_cut_mid_call_is_an_error_not_a_crash(tok):
    out = parse_output(tok, completion(tok, "", '[{"name": "get_weather", "argum', eos=False))
    assert out.tool_calls == [] and "not valid JSON" in out.error


def test_new_ids_are_random_and_valid():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(TOOL_CALL_ID.fullmatch(i) for i in ids)
