"""The OpenAI-compatible server, driven by the real `openai` client over loopback."""

from __future__ import annotations

import json
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import jsonschema
import pytest
import torch

from mistral_nemo import Transformer
from mistral_nemo.engine import LLM
from mistral_nemo.server import create_app
from mistral_nemo.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key"
MODEL = "nemo-tiny"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """Run the app with uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{base}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_mistral):
    model = Transformer.from_pretrained(tiny_mistral)
    llm = LLM(
        model, Tokenizer.from_pretrained(tiny_mistral), kv_cache_memory="64MiB", max_model_len=4096
    )
    with serving(create_app(llm, MODEL, api_key=API_KEY, max_body_bytes=2**20)) as base:
        yield base, llm


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 4 and 1 <= r.usage.completion_tokens <= 8


def test_completion_and_echo(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, echo=True, logprobs=2
    )
    assert r.choices[0].text.startswith("Once upon a time")
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason


def test_sse_ends_with_done(server):
    with httpx.stream(
        "POST",
        f"{server[0]}/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_and_seed(client):
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Pick"}],
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
    }
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert len(a.choices) == 3
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1


def test_tool_call_round_trip(client):
    # "required" forces a call; the answer is in OpenAI shape and goes back as a tool result.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # a random model may not close the JSON
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert len(call.id) == 9 and call.id.isalnum()
        json.loads(call.function.arguments)
        follow = client.chat.completions.create(
            model=MODEL,
            tools=TOOLS,
            max_tokens=5,
            temperature=0,
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 18}'},
            ],
        )
        assert follow.choices[0].message.role == "assistant"
    else:
        assert choice.finish_reason == "length"


def script_completion(monkeypatch, ids: list[int], max_tokens: int) -> None:
    """Make the model answer exactly `ids` to requests with this max_tokens."""
    import mistral_nemo.engine.engine as engine_module

    real = engine_module.sample_batch

    def scripted(logits, params, prompts, outputs, generators):
        tokens, lps = real(logits, params, prompts, outputs, generators)
        return [
            ids[len(o)] if p.max_tokens == max_tokens else t
            for t, p, o in zip(tokens, params, outputs, strict=True)
        ], lps

    monkeypatch.setattr(engine_module, "sample_batch", scripted)


def test_tool_calls_are_parsed_and_streamed(server, client, monkeypatch):
    """Make the model emit a complete call, and check both response shapes."""
    llm = server[1]
    tok = llm.tokenizer
    call = [
        tok.control_id("[TOOL_CALLS]"),
        *tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
        tok.eos_id,
    ]
    script_completion(monkeypatch, call, 77)
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "max_tokens": 77,
        "temperature": 0,
    }
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas).strip()  # no JSON leaks as text
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(tool_choice="none", **kwargs)
    assert none.choices[0].finish_reason != "tool_calls"


def test_unparsable_tool_calls_stream_the_text_they_answer(server, client, monkeypatch):
    """Calls that do not parse leave the answer as text: the stream, which held the text
    back from [TOOL_CALLS] on, sends the same text as the whole answer."""
    tok = server[1].tokenizer
    answer = [
        *tok.encode("Let me see. "),
        tok.control_id("[TOOL_CALLS]"),
        *tok.encode('[{"name": 5}]'),
        tok.eos_id,
    ]
    script_completion(monkeypatch, answer, 78)
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
        "max_tokens": 78,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "stop" and not whole.message.tool_calls
    assert whole.message.content.startswith("Let me see. ")
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_errors_surface_as_client_exceptions(server, client):
    msg = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=msg)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="at most 128"):
        client.chat.completions.create(model=MODEL, messages=msg, tools=TOOLS * 129)
    with pytest.raises(openai.BadRequestError, match="exactly 9"):
        client.chat.completions.create(
            model=MODEL,
            tools=TOOLS,
            messages=[
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "bad",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "bad", "content": "1"},
            ],
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=msg, max_tokens=-5)
    with pytest.raises(
        openai.BadRequestError,
        match=r"prompt of \d+ tokens plus max_tokens "
        r"10 exceeds the context of 4096",
    ):
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="max_tokens 100000000"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000_000)


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (b'{"model": "nemo-tiny", "messages": "hello"}', 400),
        (b'{"model": 5, "messages": []}', 400),
        (b'{"model": "nemo-tiny", "messages": [], "temperature": "hot"}', 400),
        (b'{"model": "nemo-tiny", "messages": []}', 400),
        (b'{"model": "nemo-tiny", "messages": [{"role": "user"}], "n": 0}', 400),
        (
            b'{"model": "nemo-tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"tool_choice": "required"}',
            400,
        ),
    ],
)
def test_malformed_requests_get_openai_errors(server, body, status):
    r = httpx.post(
        f"{server[0]}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_body_over_the_limit_is_413(server):
    big = json.dumps({"model": MODEL, "prompt": "x" * (2**20 + 10)})
    r = httpx.post(
        f"{server[0]}/v1/completions",
        content=big,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_concurrent_requests_are_batched_and_match_alone(server, client):
    prompts = [f"Request number {i} says" for i in range(8)]

    def ask(p):
        return (
            client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
            .choices[0]
            .text
        )

    alone = [ask(p) for p in prompts]
    steps_before = server[1].engine.preemptions
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert server[1].engine.preemptions == steps_before


def test_disconnect_mid_stream_frees_blocks(server):
    llm = server[1]
    with httpx.stream(
        "POST",
        f"{server[0]}/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": MODEL,
            "prompt": "Go",
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    for _ in range(100):
        if llm.engine.pool.num_free == llm.engine.pool.num_blocks and not llm.engine.requests:
            break
        time.sleep(0.05)
    assert not llm.engine.requests
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_mistralai_client(server):
    pytest.importorskip("mistralai")
    try:
        from mistralai.client import Mistral
    except ImportError:
        from mistralai import Mistral  # mistralai 1.x
    m = Mistral(api_key=API_KEY, server_url=server[0])
    r = m.chat.complete(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == 4
    tool = {"type": "function", "function": {"name": "plan", "parameters": WEATHER_SCHEMA}}
    r = m.chat.complete(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan"}],
        tools=[tool],
        tool_choice="any",  # Mistral's "required"
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=1.0,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    arguments = call.function.arguments
    jsonschema.validate(
        json.loads(arguments) if isinstance(arguments, str) else arguments, WEATHER_SCHEMA
    )


def test_bf16_server_model_runs(tiny_mistral):
    llm = LLM(
        Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16),
        Tokenizer.from_pretrained(tiny_mistral),
        kv_cache_memory="8MiB",
    )
    app = create_app(llm, MODEL)
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_engine_failure_fails_the_request_and_the_server_keeps_serving(server, monkeypatch):
    llm = server[1]
    real = llm.engine.step
    failures = iter([RuntimeError("boom")])

    def failing_once():
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real()

    monkeypatch.setattr(llm.engine, "step", failing_once)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    r = httpx.post(f"{server[0]}/v1/completions", headers=headers, json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom" in r.json()["error"]["message"]
    r = httpx.post(f"{server[0]}/v1/completions", headers=headers, json=body)
    assert r.status_code == 200
    assert not llm.engine.requests and llm.engine.pool.num_free == llm.engine.pool.num_blocks


# -- the event loop never waits for the engine ------------------------------------------------

CHUNK = 16
LONG_PROMPT = list(range(1000, 1000 + 40 * CHUNK))  # 40 prefill steps


@pytest.fixture(scope="module")
def chunked_server(tiny_mistral):
    """A server whose engine prefills CHUNK tokens a step, so a long prompt takes many (and
    all of them every time: no prefix caching)."""
    llm = LLM(
        Transformer.from_pretrained(tiny_mistral),
        Tokenizer.from_pretrained(tiny_mistral),
        kv_cache_memory="64MiB",
        max_model_len=4096,
        max_num_batched_tokens=CHUNK,
        enable_prefix_caching=False,
    )
    with serving(create_app(llm, MODEL)) as base:
        yield base, llm


class StepGate:
    """Stands in for an engine's step: a step waits until the gate opens, as a step stuck in
    a long prefill chunk would. Records, for each step, whether the short request (a prompt
    under CHUNK tokens) was in the engine when it began and which requests got a token."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.step = engine.step
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.short_present: list[bool] = []
        self.advanced: list[set[str]] = []  # "short" / "long", per step

    def __call__(self):
        self.entered.set()
        assert self.opened.wait(timeout=60)
        self.short_present.append(any(len(r.prompt) < CHUNK for r in self.engine.requests.values()))
        outputs = self.step()
        self.advanced.append(
            {"short" if len(o.prompt_token_ids) < CHUNK else "long" for o in outputs}
        )
        return outputs

    def first(self, kind: str) -> int:
        return next(i for i, names in enumerate(self.advanced) if kind in names)


def signal_on_encode(tokenizer, monkeypatch) -> threading.Event:
    """An event set once a handler has encoded a text prompt: it submits it right after,
    without yielding to the event loop."""
    encoded = threading.Event()
    encode = tokenizer.encode

    def watched(*args, **kwargs):
        ids = encode(*args, **kwargs)
        encoded.set()
        return ids

    monkeypatch.setattr(tokenizer, "encode", watched)
    return encoded


def complete(base: str, prompt, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_answers_while_a_step_runs(chunked_server, monkeypatch, record_property):
    """A long prefill chunk is running (held by the gate) and a second request arrives:
    the event loop must not wait for the step to hand that request over, so /health answers
    at once. (With the engine's lock taken on the event loop, it hung until the step ended.)"""
    base, llm = chunked_server
    gate = StepGate(llm.engine)
    monkeypatch.setattr(llm.engine, "step", gate)
    encoded = signal_on_encode(llm.tokenizer, monkeypatch)
    latencies = []
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=base, timeout=5) as http:
        long = pool.submit(complete, base, LONG_PROMPT, 1)
        try:
            assert gate.entered.wait(timeout=30)
            short = pool.submit(complete, base, "Hi", 2)
            assert encoded.wait(timeout=30)
            for _ in range(5):
                start = time.perf_counter()
                try:
                    r = http.get("/health")
                except httpx.TimeoutException:
                    pytest.fail("/health stalled while an engine step ran")
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 200
        finally:
            gate.opened.set()
        long.result(timeout=120)
        short.result(timeout=120)
    record_property("health_latency_ms", [round(t * 1000, 2) for t in latencies])
    assert statistics.median(latencies) < 0.05, f"/health took {latencies} s"


def test_short_request_is_not_stuck_behind_a_long_prefill(chunked_server, monkeypatch):
    """A 2-token request arriving while a 40-chunk prompt prefills gets its first token in
    the first step that sees it (after at most the one chunk then running), not after the
    long prompt's whole prefill."""
    base, llm = chunked_server
    gate = StepGate(llm.engine)
    monkeypatch.setattr(llm.engine, "step", gate)
    encoded = signal_on_encode(llm.tokenizer, monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(complete, base, LONG_PROMPT, 1)
        try:
            assert gate.entered.wait(timeout=30)
            short = pool.submit(complete, base, "Hi", 2)
            assert encoded.wait(timeout=30)
        finally:
            gate.opened.set()
        long.result(timeout=120)
        short.result(timeout=120)
    arrived = gate.short_present.index(True)
    assert arrived < gate.first("long"), "the short request came after the long prefill"
    assert gate.first("short") == arrived, (
        f"the short request arrived before step {arrived} but got its first token in step "
        f"{gate.first('short')}; the long prompt's prefill ended in step {gate.first('long')}"
    )


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_structured_outputs(client):
    """response_format and vLLM's guided_* fields hold the answer to the format."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Plan"}], "temperature": 1.0}
    r = client.chat.completions.create(
        max_tokens=100,
        n=3,
        seed=5,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "plan", "schema": WEATHER_SCHEMA, "strict": True},
        },
        **base,
    )
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), WEATHER_SCHEMA)
    r = client.chat.completions.create(
        max_tokens=20, extra_body={"guided_choice": ["red", "green"]}, **base
    )
    assert r.choices[0].message.content in ("red", "green")
    text = client.completions.create(
        model=MODEL, prompt="Code:", max_tokens=20, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert re.fullmatch("[0-9]{4}", text.choices[0].text)
    chunks = client.chat.completions.create(
        max_tokens=100, stream=True, response_format={"type": "json_object"}, **base
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if streamed.endswith("}"):
        assert isinstance(json.loads(streamed), dict)


def test_tool_choice_required_always_calls(client):
    # Bounded strings: random weights would never close an unbounded one.
    tools = [
        {"type": "function", "function": {"name": name, "parameters": WEATHER_SCHEMA}}
        for name in ("plan", "book")
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Go"}],
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=1.0,
        n=4,
        seed=2,
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
            None,
        ),
        ({"guided_regex": "(unclosed"}, None),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
    ],
)
def test_bad_structured_outputs_are_400s(server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra}
    r = httpx.post(
        f"{server[0]}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param
