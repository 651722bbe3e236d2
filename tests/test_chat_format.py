"""encode_chat against mistral-common's Mistral NeMo (instruct V3, Tekken) encoding."""

from __future__ import annotations

import copy

import pytest

from mistral_nemo import InvalidRequestError
from mistral_nemo.tokenizer import Tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file

mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


@pytest.fixture(scope="module")
def ref():
    return mistral.MistralTokenizer.from_file(str(reference_tekken_file()))


def reference_ids(ref, messages, tools=None, continue_final_message=False):
    request = ChatCompletionRequest.from_openai(
        messages=copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        continue_final_message=continue_final_message,
    )
    return ref.encode_chat_completion(request).tokens


def fn(name, description, properties, required=()):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(required)},
        },
    }


WEATHER = fn(
    "get_weather",
    "Get the current weather for a city",
    {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    ["city"],
)
SEARCH = fn(
    "web_search",
    "Search the web",
    {"query": {"type": "string"}, "max_results": {"type": "integer"}},
    ["query"],
)
CONVERT = fn(
    "convert-currency",
    "Convert an amount between currencies",
    {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
    ["amount", "from", "to"],
)
NO_PARAMS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, CONVERT]


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text=None, calls=None):
    m = {"role": "assistant", "content": text}
    if calls:
        m["tool_calls"] = calls
    return m


def system(text):
    return {"role": "system", "content": text}


def tool(id_, content, name=None):
    m = {"role": "tool", "tool_call_id": id_, "content": content}
    if name:
        m["name"] = name
    return m


PARIS = call("abcDEF123", "get_weather", '{"city": "Paris", "unit": "celsius"}')
TOKYO = call("Z9y8X7w6V", "get_weather", '{"city": "東京"}')

# (name, messages, tools, continue_final_message)
CONVERSATIONS = [
    ("one user", [user("Hello")], None, False),
    ("empty user", [user("")], None, False),
    ("whitespace kept", [user("  hi there \n")], None, False),
    ("system + user", [system("You are a helpful assistant."), user("Hi!")], None, False),
    ("system only", [system("Be brief.")], None, False),
    (
        "multi-turn",
        [
            user("Hi"),
            assistant("Hello! How can I help? "),
            user("Tell me a joke"),
            assistant("Why did the chicken cross the road?"),
            user("Why?"),
        ],
        None,
        False,
    ),
    ("system in multi-turn", [system("S"), user("a"), assistant("b"), user("c")], None, False),
    (
        "two systems",
        [system("First rule."), user("a"), system("Second rule."), user("b")],
        None,
        False,
    ),
    ("consecutive users merge", [user("part one"), user("part two")], None, False),
    (
        "consecutive assistants merge",
        [user("a"), assistant("x"), assistant("y"), user("b")],
        None,
        False,
    ),
    ("starts with assistant", [assistant("I start."), user("ok")], None, False),
    (
        "content parts",
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            }
        ],
        None,
        False,
    ),
    (
        "unicode chat",
        [
            user("Привет! 你好! مرحبا! 👋🏽"),
            assistant("Здравствуйте 😊"),
            user("日本語で答えてください"),
        ],
        None,
        False,
    ),
    ("control-token-like text", [user("[INST] </s> [TOOL_CALLS] is just text")], None, False),
    ("tools listed", [user("What's the weather in Paris?")], TOOLS, False),
    (
        "tools before last user only",
        [user("Hi"), assistant("Hello"), user("Weather in Rome?")],
        TOOLS,
        False,
    ),
    ("tools + system", [system("Use tools when useful."), user("Weather in Oslo?")], TOOLS, False),
    ("tool without parameters", [user("What time is it?")], [NO_PARAMS], False),
    (
        "tool call + result",
        [
            user("Weather in Paris?"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", '{"temperature": 18, "sky": "cloudy"}'),
        ],
        TOOLS,
        False,
    ),
    (
        "tool call + result + answer + follow-up",
        [
            system("SYS"),
            user("Weather in Paris?"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", '{"temperature": 18}'),
            assistant("It is 18 °C in Paris."),
            user("And tomorrow?"),
        ],
        TOOLS,
        False,
    ),
    (
        "parallel tool calls",
        [
            user("Weather in Paris and Tokyo?"),
            assistant(calls=[PARIS, TOKYO]),
            tool("abcDEF123", '{"t": 18}'),
            tool("Z9y8X7w6V", '{"t": 25}'),
        ],
        TOOLS,
        False,
    ),
    (
        "results in other order",
        [
            user("Both?"),
            assistant(calls=[PARIS, TOKYO]),
            tool("Z9y8X7w6V", "25"),
            tool("abcDEF123", "18"),
        ],
        TOOLS,
        False,
    ),
    (
        "plain-text tool result",
        [user("Weather?"), assistant(calls=[PARIS]), tool("abcDEF123", "sunny and warm")],
        TOOLS,
        False,
    ),
    (
        "empty tool result",
        [user("Ping"), assistant(calls=[call("a1b2c3d4e", "now", "")]), tool("a1b2c3d4e", "")],
        [NO_PARAMS],
        False,
    ),
    (
        "tool name on result",
        [
            user("Weather?"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", '{"t": 1}', name="get_weather"),
        ],
        TOOLS,
        False,
    ),
    (
        "unicode arguments",
        [
            user("Convert"),
            assistant(
                calls=[
                    call(
                        "Q1w2E3r4T",
                        "convert-currency",
                        '{"amount": 12.50, "from": "€", "to": "¥", "note": "ünïcödé \\u00e9"}',
                    )
                ]
            ),
            tool("Q1w2E3r4T", '{"result": "1 980 ¥"}'),
        ],
        TOOLS,
        False,
    ),
    (
        "dict arguments",
        [
            user("Search"),
            assistant(calls=[call("s1s2s3s4s", "web_search", {"query": "mistral nemo"})]),
            tool("s1s2s3s4s", '["a", "b"]'),
        ],
        TOOLS,
        False,
    ),
    (
        "invalid-json arguments kept as text",
        [
            user("Search"),
            assistant(calls=[call("s1s2s3s4s", "web_search", "not json")]),
            tool("s1s2s3s4s", "ok"),
        ],
        TOOLS,
        False,
    ),
    (
        "tool round trip then new question with tools",
        [
            user("Weather in Paris?"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", "18"),
            assistant("18 degrees."),
            user("Search for news about it"),
            assistant(calls=[call("n3w5s3arc", "web_search", '{"query": "Paris weather news"}')]),
            tool("n3w5s3arc", '{"results": []}'),
        ],
        TOOLS,
        False,
    ),
    (
        "two tool rounds",
        [
            user("Q"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", "1"),
            assistant(calls=[TOKYO]),
            tool("Z9y8X7w6V", "2"),
        ],
        TOOLS,
        False,
    ),
    ("continue final message", [user("Say hi"), assistant("Hi there ")], None, True),
    (
        "continue after tools",
        [
            user("Weather?"),
            assistant(calls=[PARIS]),
            tool("abcDEF123", "18"),
            assistant("The temperature is"),
        ],
        TOOLS,
        True,
    ),
    ("long system prompt", [system("You are NeMo.\n" * 40), user("Go")], None, False),
    (
        "assistant with trailing newline kept",
        [user("a"), assistant("line\n"), user("b")],
        None,
        False,
    ),
]


def test_at_least_30_conversations():
    assert len(CONVERSATIONS) >= 30
    assert sum(1 for c in CONVERSATIONS if c[2]) >= 10


@pytest.mark.parametrize(
    "name, messages, tools, cont", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS]
)
def test_encode_chat_matches_mistral_common(ours, ref, name, messages, tools, cont):
    expected = reference_ids(ref, messages, tools, cont)
    assert ours.encode_chat(messages, tools, continue_final_message=cont) == expected


def test_inputs_are_not_modified(ours):
    messages = [user("Weather in Paris?"), assistant(calls=[PARIS]), tool("abcDEF123", "18")]
    before = copy.deepcopy(messages)
    ours.encode_chat(messages, TOOLS)
    assert messages == before


BAD = [
    ("empty conversation", [], None, "messages: the conversation is empty"),
    (
        "unknown role",
        [{"role": "robot", "content": "x"}],
        None,
        "messages[0].role: unknown role 'robot'",
    ),
    (
        "short call id",
        [user("q"), assistant(calls=[call("abc", "get_weather", "{}")]), tool("abc", "1")],
        TOOLS,
        "messages[1].tool_calls[0].id: tool call id 'abc' must be exactly 9",
    ),
    (
        "non-ascii call id",
        [
            user("q"),
            assistant(calls=[call("abcdefgh€", "get_weather", "{}")]),
            tool("abcdefgh€", "1"),
        ],
        TOOLS,
        "exactly 9 ASCII",
    ),
    (
        "bad result id",
        [user("q"), assistant(calls=[PARIS]), tool("abcDEF12!", "1")],
        TOOLS,
        "messages[2].tool_call_id",
    ),
    (
        "result for no call",
        [user("q"), assistant(calls=[PARIS]), tool("zzzzzzzzz", "1")],
        TOOLS,
        "messages[2].tool_call_id: tool result 'zzzzzzzzz' answers no pending tool call",
    ),
    (
        "unanswered call",
        [user("q"), assistant(calls=[PARIS, TOKYO]), tool("abcDEF123", "1")],
        TOOLS,
        "messages[1]: tool call 'Z9y8X7w6V' has no tool result",
    ),
    (
        "user before result",
        [user("q"), assistant(calls=[PARIS]), user("well?")],
        TOOLS,
        "tool call 'abcDEF123' has no tool result before messages[2]",
    ),
    (
        "bad function name",
        [user("q")],
        [fn("get weather!", "", {})],
        "tools[0].function.name: function name 'get weather!'",
    ),
    ("name too long", [user("q")], [fn("x" * 65, "", {})], "1 to 64"),
    (
        "bad schema",
        [user("q")],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "notatype"}}}],
        "tools[0].function.parameters: not a valid JSON Schema",
    ),
    (
        "129 tools",
        [user("q")],
        [fn(f"f{i}", "", {}) for i in range(129)],
        "tools: 129 tools given; at most 128 are allowed",
    ),
    (
        "tool after user",
        [user("q"), tool("abcDEF123", "1")],
        TOOLS,
        "messages[1]: a tool message cannot follow a user message",
    ),
    (
        "system after assistant",
        [user("q"), assistant("a"), system("s"), user("b")],
        None,
        "messages[2]: a system message cannot follow a assistant message",
    ),
    (
        "ends with assistant",
        [user("q"), assistant("a")],
        None,
        "messages[1]: the last message must be a user or tool message",
    ),
    ("lone assistant", [assistant("a")], None, "messages[0]: a conversation of one message"),
    (
        "content and calls",
        [user("q"), assistant("text", calls=[PARIS]), tool("abcDEF123", "1")],
        TOOLS,
        "either content or tool_calls",
    ),
    (
        "empty assistant",
        [user("q"), assistant(""), user("r")],
        None,
        "messages[1]: an assistant message must have either content or tool_calls",
    ),
    (
        "image part",
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        None,
        "messages[0].content[0]: only text content parts",
    ),
    (
        "system without content",
        [{"role": "system", "content": None}, user("x")],
        None,
        "a system message must have content",
    ),
    (
        "duplicate call id",
        [
            user("q"),
            assistant(calls=[PARIS, PARIS]),
            tool("abcDEF123", "1"),
            tool("abcDEF123", "1"),
        ],
        TOOLS,
        "is used twice",
    ),
]


@pytest.mark.parametrize("name, messages, tools, message", BAD, ids=[b[0] for b in BAD])
def test_invalid_requests_name_message_and_rule(ours, name, messages, tools, message):
    with pytest.raises(InvalidRequestError) as e:
        ours.encode_chat(messages, tools)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "name",
    [
        "short call id",
        "bad function name",
        "bad schema",
        "tool after user",
        "system after assistant",
        "content and calls",
        "empty conversation",
        "lone assistant",
    ],
)
def test_mistral_common_rejects_the_same(ref, name):
    _, messages, tools, _ = next(b for b in BAD if b[0] == name)
    with pytest.raises(Exception):  # noqa: B017 - any of mistral-common's exceptions
        reference_ids(ref, messages, tools)


def test_tool_calls_on_other_roles_are_ignored(ours, ref):
    messages = [
        {"role": "user", "content": "hi", "tool_calls": 5},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again", "tool_calls": "x"},
    ]
    clean = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    assert ours.encode_chat(messages) == reference_ids(ref, clean)
