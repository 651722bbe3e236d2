"""The tool-calling data (benchmarks/data/tool_calls_*.jsonl) and its scorer
(`mistral_nemo.eval.tool_calls`)."""

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from mistral_nemo.demo import demo_model_path
from mistral_nemo.engine import LLM
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.tool_calls import (
    expected_calls,
    grade,
    load_conversations,
    parse_answer,
    parse_text_tool_calls,
    prompt_ids,
    score_tool_calls,
    summarize,
    to_text_tools,
)
from mistral_nemo.tokenizer import Tokenizer, load_tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file
from mistral_nemo.tokenizer.validation import TOOL_CALL_ID

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
SPLITS = ("train", "heldout")
RATES = (
    "accuracy",
    "call_rate",
    "parse_rate",
    "name_accuracy",
    "schema_valid_rate",
    "arguments_accuracy",
    "no_call_accuracy",
)


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {split: load_conversations(DATA / f"tool_calls_{split}.jsonl") for split in SPLITS}


@pytest.fixture(scope="module")
def tekken() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


def all_conversations(data):
    return [c for split in SPLITS for c in data[split]]


def first_user(conversation):
    return next(m["content"] for m in conversation["messages"] if m["role"] == "user")


def first_assistant(messages):
    return next(m for m in messages if m["role"] == "assistant")


def tool_names(conversation):
    return [t["function"]["name"] for t in conversation["tools"]]


def one_of_each_kind(conversations):
    """The first conversation that expects no call, one call, two calls."""
    by_calls = {}
    for c in conversations:
        by_calls.setdefault(len(expected_calls(c)), c)
    return [by_calls[n] for n in (0, 1, 2)]


def answer_with(calls):
    """A text-format answer making `calls`, (name, arguments) pairs."""
    text = json.dumps([{"name": n, "arguments": a} for n, a in calls])
    return parse_text_tool_calls(f"<tool_call>{text}</tool_call>")


# --- the data -------------------------------------------------------------------------------


def test_the_script_rebuilds_the_files():
    script = ROOT / "benchmarks" / "make_tool_data.py"
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sizes_and_mix(data):
    assert len(data["train"]) >= 200 and len(data["heldout"]) >= 50
    assert len({n for c in all_conversations(data) for n in tool_names(c)}) >= 10
    assert sum((DATA / f"tool_calls_{s}.jsonl").stat().st_size for s in SPLITS) < 2**20
    for split in SPLITS:
        calls = Counter(len(expected_calls(c)) for c in data[split])
        assert set(calls) == {0, 1, 2}, f"{split}: no-call, single and parallel items"
        assert all(2 <= len(c["tools"]) <= 6 for c in data[split])


def test_every_call_is_valid(data, tekken):
    for conversation in all_conversations(data):
        tools = conversation["tools"]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for message in conversation["messages"]:
            for call in message.get("tool_calls") or []:
                assert TOOL_CALL_ID.fullmatch(call["id"])
                arguments = json.loads(call["function"]["arguments"])
                jsonschema.validate(arguments, schemas[call["function"]["name"]])
        # NeMo's request rules hold (no tool defined twice, every call answered by a result
        # with its id, roles in order) and the conversation encodes in the instruct format.
        assert tekken.encode_chat(conversation["messages"][:-1], tools)


def test_no_user_message_in_both_splits(data):
    train = {first_user(c) for c in data["train"]}
    heldout = [first_user(c) for c in data["heldout"]]
    assert len(set(heldout)) == len(heldout)
    assert not train & set(heldout)


# --- the text format ------------------------------------------------------------------------


def test_to_text_tools_is_pure_and_plain_chat(data):
    for conversation in all_conversations(data):
        before = copy.deepcopy(conversation)
        messages = to_text_tools(conversation)["messages"]
        assert conversation == before
        assert all(m["role"] in ("system", "user", "assistant") for m in messages)
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
        system = messages[0]["content"]
        assert json.loads(system.split("<tools>")[1].split("</tools>")[0]) == conversation["tools"]
        own = [m for m in conversation["messages"] if m["role"] != "system"]
        assert len(messages) == 1 + len(own)  # one system message: the tools, then its own


def test_text_calls_round_trip(data):
    for conversation in all_conversations(data):
        answer = first_assistant(to_text_tools(conversation)["messages"])["content"]
        parsed = parse_text_tool_calls(answer)
        calls = [
            {"name": c["name"], "arguments": json.loads(c["arguments"])} for c in parsed.tool_calls
        ]
        assert calls == expected_calls(conversation) and parsed.error is None
        assert parsed.content == ("" if calls else answer)


def test_the_demo_chat_template_renders_the_text_format(data):
    tok = load_tokenizer(demo_model_path())
    conversation = one_of_each_kind(data["heldout"])[2]
    messages = to_text_tools(conversation)["messages"]
    text = tok.decode(tok.encode_chat(messages[:-1]))
    assert text.count("<tool_response>") == 2 and "<tools>" in text and "<tool_call>" in text
    ids = tok.encode(first_assistant(messages)["content"]) + [tok.eos_id]
    assert grade(conversation, parse_answer(tok, ids, "text"))["correct"]


@pytest.mark.parametrize(
    "text, names, error",
    [
        ("It is sunny.", [], False),
        ("<tool_call>[]</tool_call>", [], False),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', ["f"], False),
        ('<tool_call>[{"name": "f", "arguments": {}}, {"name": "g"}]', ["f", "g"], False),
        ('<tool_call>[{"name": "f", "arguments": {"a": </tool_call>', [], True),
    ],
)
def test_parse_text_tool_calls(text, names, error):
    out = parse_text_tool_calls(text)
    assert [c["name"] for c in out.tool_calls] == names
    assert (out.error is not None) == error
    assert all(TOOL_CALL_ID.fullmatch(c["id"]) for c in out.tool_calls)
    if error:
        assert out.content == text


# --- grading --------------------------------------------------------------------------------


def perfect_ids(tok, conversation, chat_format):
    """What a model that learned the data generates for the first assistant turn."""
    if chat_format == "text":
        text = first_assistant(to_text_tools(conversation)["messages"])["content"]
        return tok.encode(text) + [tok.eos_id]
    if not (calls := expected_calls(conversation)):
        return tok.encode(first_assistant(conversation["messages"])["content"]) + [tok.eos_id]
    return [tok.control_id("[TOOL_CALLS]"), *tok.encode(json.dumps(calls)), tok.eos_id]


@pytest.mark.parametrize("chat_format", ["mistral", "text"])
def test_perfect_answers_score_full_marks(data, tekken, chat_format):
    conversations = data["heldout"]
    items = [
        grade(c, parse_answer(tekken, perfect_ids(tekken, c, chat_format), chat_format))
        for c in conversations
    ]
    report = summarize(items)
    assert report["items"] == len(conversations) == len(report["details"])
    assert report["call_items"] == sum(bool(expected_calls(c)) for c in conversations)
    assert report["call_items"] + report["no_call_items"] == report["items"]
    assert all(report[rate] == 1.0 for rate in RATES)


def test_partial_credit(data):
    def free_strings(conversation):
        """Arguments of the single call whose schema leaves the string free (no enum or
        pattern): they may differ from the expected ones in case and spacing."""
        (call,) = expected_calls(conversation)
        tool = next(t for t in conversation["tools"] if t["function"]["name"] == call["name"])
        props = tool["function"]["parameters"]["properties"]
        return [
            k
            for k, v in call["arguments"].items()
            if props[k].keys() == {"type", "description"} and isinstance(v, str)
        ]

    conversation = next(
        c for c in data["heldout"] if len(expected_calls(c)) == 1 and free_strings(c)
    )
    (call,) = expected_calls(conversation)
    name, arguments = call["name"], call["arguments"]
    shouted = {**arguments, **{k: f" {arguments[k].upper()} " for k in free_strings(conversation)}}
    assert shouted != arguments and grade(conversation, answer_with([(name, shouted)]))["correct"]

    wrong_value = {**arguments, free_strings(conversation)[0]: "something else"}
    item = grade(conversation, answer_with([(name, wrong_value)]))
    assert item["schema_valid"] and item["names_match"] and not item["arguments_match"]
    assert not item["correct"]
    item = grade(conversation, answer_with([(name, {})]))  # required arguments missing
    assert item["names_match"] and not item["schema_valid"] and not item["correct"]
    other = next(n for n in tool_names(conversation) if n != name)
    item = grade(conversation, answer_with([(other, arguments)]))
    assert item["parsed"] and not item["names_match"] and not item["correct"]
    item = grade(conversation, answer_with([(name, arguments)] * 2))
    assert not item["names_match"] and not item["correct"]
    item = grade(conversation, parse_text_tool_calls("<tool_call>[{oops"))
    assert item["called"] and not item["parsed"] and not item["correct"]
    item = grade(conversation, parse_text_tool_calls("Sure, it is sunny."))
    assert not item["called"] and not item["correct"]
    report = summarize([item])
    assert report["call_rate"] == 0.0 and report["no_call_accuracy"] is None


def test_parallel_calls_match_in_any_order(data):
    conversation = one_of_each_kind(data["heldout"])[2]
    calls = [(c["name"], c["arguments"]) for c in expected_calls(conversation)]
    assert grade(conversation, answer_with(calls[::-1]))["correct"]
    item = grade(conversation, answer_with(calls[:1]))
    assert item["schema_valid"] and not item["arguments_match"] and not item["correct"]


def test_calling_when_no_call_is_expected(data):
    conversation = one_of_each_kind(data["heldout"])[0]
    item = grade(conversation, answer_with([(tool_names(conversation)[0], {})]))
    assert item["called"] and not item["correct"]
    report = summarize([item])
    assert report["no_call_accuracy"] == 0.0 and report["call_rate"] is None


def test_unknown_chat_format(data, tekken):
    with pytest.raises(InvalidRequestError, match="chat format"):
        prompt_ids(tekken, data["heldout"][0], "chatml")


# --- the scorer end to end ------------------------------------------------------------------


@pytest.mark.parametrize("chat_format", ["mistral", "text"])
def test_score_tool_calls_on_a_random_checkpoint(tiny_mistral, data, chat_format):
    llm = LLM(tiny_mistral, kv_cache_memory="16MiB")
    conversations = one_of_each_kind(data["heldout"])
    report = score_tool_calls(llm, conversations, chat_format, max_tokens=6)
    assert report["chat_format"] == chat_format
    assert (report["items"], report["call_items"], report["no_call_items"]) == (3, 2, 1)
    no_call, *calls = report["details"]
    for item, conversation in zip(report["details"], conversations, strict=True):
        assert item["expected"] == expected_calls(conversation)
        assert isinstance(item["output"], str)
        assert item["called"] == (bool(item["calls"]) or item["error"] is not None)
    # Six tokens of a random model cannot hold a right call; its one chance is to call nothing.
    assert not any(item["correct"] for item in calls)
    assert no_call["correct"] == (not no_call["called"])
    assert report["accuracy"] == no_call["correct"] / 3
    assert report["no_call_accuracy"] == float(no_call["correct"])
    assert report["arguments_accuracy"] == 0.0
