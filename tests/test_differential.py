"""Property-based differential tests of the chat encoder and Tekken against mistral-common
1.13.1 (strategies and the list of deliberate differences: `tests/differential.py`)."""

from __future__ import annotations

import pytest
from differential import (
    STRICTER,
    conversations,
    disagreement,
    ours,
    reference,
    stricter_rule,
    tekken_disagreement,
    tekken_text,
    tools,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_nemo.tokenizer import Tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file

mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
CI = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


@pytest.fixture(scope="module")
def ref():
    return mistral.MistralTokenizer.from_file(str(reference_tekken_file()))


@settings(CI, max_examples=4000)
@given(messages=conversations, tool_list=tools, cont=st.booleans())
def test_chat_requests_decide_and_encode_as_mistral_common(tok, ref, messages, tool_list, cont):
    assert disagreement(tok, ref, messages, tool_list, cont) is None


@settings(CI, max_examples=1500)
@given(text=tekken_text)
def test_tekken_text_as_mistral_common(tok, ref, text):
    assert tekken_disagreement(tok, ref.instruct_tokenizer.tokenizer, text) is None


def test_each_deliberate_difference_is_real(tok, ref):
    """Every rule in STRICTER names a request mistral-common accepts and we refuse by it."""
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    weather = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    user = {"role": "user", "content": "hi"}
    examples = {
        "every tool call needs its result": (
            [user, {"role": "assistant", "tool_calls": [call]}, user],
            [weather],
        ),
        "tool call ids are unique": (
            [user, {"role": "assistant", "tool_calls": [call, call]}]
            + [{"role": "tool", "tool_call_id": "abcDEF123", "content": "1"}] * 2,
            [weather],
        ),
        "a result answers a call": (
            [
                user,
                {"role": "assistant", "content": "ok"},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"},
            ],
            [weather],
        ),
        "tool names are unique": ([user], [weather, weather]),
        "continue_final_message continues text": (
            [user, {"role": "assistant", "tool_calls": [call]}],
            [weather],
            True,
        ),
    }
    assert set(examples) == set(STRICTER)
    for name, (messages, tool_list, *cont) in examples.items():
        assert reference(ref, messages, tool_list, bool(cont)).ids is not None, name
        assert stricter_rule(ours(tok, messages, tool_list, bool(cont)).error) == name
