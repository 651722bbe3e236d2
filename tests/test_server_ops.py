"""Running the server in production: /metrics, /tokenize and /detokenize, the optional model
field, a bounded waiting queue (429 + Retry-After), per-request logs, and SIGTERM draining
the requests in flight."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_process import wait_for_server
from test_server import MODEL, free_port, serving

from mistral_nemo import Transformer
from mistral_nemo.engine import LLM
from mistral_nemo.server import create_app
from mistral_nemo.tokenizer import Tokenizer

REQUESTS_LOG = "mistral_nemo.server.requests"


def _llm(path, **engine) -> LLM:
    model = Transformer.from_pretrained(path)
    return LLM(model, Tokenizer.from_pretrained(path), kv_cache_memory="32MiB", **engine)


@pytest.fixture(scope="module")
def ops(tiny_mistral):
    llm = _llm(tiny_mistral, max_model_len=2048)
    with serving(create_app(llm, MODEL, json_logs=True)) as base:
        yield base, llm


def metric_samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base}/metrics").text
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_latency_and_errors(ops):
    base, llm = ops
    before = metric_samples(base)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
    r = httpx.post(f"{base}/v1/chat/completions", json=body)  # no model field: one is served
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert httpx.post(f"{base}/v1/chat/completions", json={**body, "model": "x"}).status_code == 404
    after = metric_samples(base)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    p = "mistral_nemo:"
    assert grew(f"{p}prompt_tokens_total") == usage["prompt_tokens"]
    assert grew(f"{p}generation_tokens_total") == usage["completion_tokens"] == 5
    assert grew(f"{p}time_to_first_token_seconds_count") == 1
    assert grew(f"{p}inter_token_latency_seconds_count") == 4  # between 5 tokens
    assert grew(f"{p}e2e_request_latency_seconds_count") == 1
    assert grew(f"{p}http_requests_total", status="200") == 1
    assert grew(f"{p}request_errors_total", status="404") == 1
    idle = {name: v for (name, _), v in after.items() if "kv_cache_blocks" in name}
    assert idle[f"{p}kv_cache_blocks_free"] == llm.engine.pool.num_blocks
    assert idle[f"{p}kv_cache_blocks_used"] == 0
    assert after[(f"{p}num_requests_running", ())] == after[(f"{p}num_requests_waiting", ())] == 0


def test_tokenize_and_detokenize(ops):
    base, llm = ops
    tok = llm.tokenizer
    r = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.json() == {
        "count": 3,
        "max_model_len": 2048,
        "tokens": tok.encode("Hello world", bos=True),
    }
    r = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})
    assert r.json()["tokens"] == tok.encode("Hello world")
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(f"{base}/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == tok.encode_chat(messages)
    r = httpx.post(f"{base}/detokenize", json={"tokens": tok.encode("Ünïcödé text")})
    assert r.json() == {"prompt": "Ünïcödé text"}
    for path, body, message in [
        ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
        ("/tokenize", {"messages": [{"role": "tool"}]}, "messages[0]"),
        ("/tokenize", {}, "either prompt or messages"),
        ("/tokenize", {"model": "other", "prompt": "x"}, "does not exist"),
    ]:
        r = httpx.post(f"{base}{path}", json=body)
        assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"]


def test_one_json_log_line_per_request(ops, caplog):
    base, _ = ops
    with caplog.at_level(logging.INFO, logger=REQUESTS_LOG):
        body = {"prompt": "Hi", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": -1})
        for _ in range(50):  # the streamed one is logged once its last byte is sent
            if len(caplog.records) >= 2:
                break
            time.sleep(0.02)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == REQUESTS_LOG]
    assert len(lines) == 2
    streamed, refused = lines
    assert streamed["request_id"].startswith("cmpl-") and streamed["status"] == "200"
    assert streamed["prompt_tokens"] == 2 and streamed["completion_tokens"] == 4
    assert 0 < streamed["ttft_s"] <= streamed["total_s"]
    assert refused["status"] == "400" and refused["request_id"] is None


class Gate:
    """Holds the engine's steps until opened."""

    def __init__(self, engine) -> None:
        self.step, self.open = engine.step, threading.Event()

    def __call__(self):
        assert self.open.wait(timeout=60)
        return self.step()


def test_full_waiting_queue_answers_429_and_loses_nothing(tiny_mistral, monkeypatch):
    """One slot, one place in the queue: of three requests, the one that finds the queue
    full is refused at once (while the engine is busy) with 429 and Retry-After; the two
    accepted ones complete."""
    llm = _llm(tiny_mistral, max_model_len=512, max_num_seqs=1)
    gate = Gate(llm.engine)
    monkeypatch.setattr(llm.engine, "step", gate)
    app = create_app(llm, MODEL, max_waiting=1)
    engine = app.state.engine
    with serving(app) as base, ThreadPoolExecutor(3) as pool:
        body = {"prompt": "Count", "max_tokens": 8, "ignore_eos": True}
        post = lambda: httpx.post(f"{base}/v1/completions", json=body, timeout=60)  # noqa: E731
        first = pool.submit(post)
        while not llm.engine.requests:  # the first is in, its step held at the gate
            time.sleep(0.01)
        second = pool.submit(post)
        while engine._inbox.qsize() < 1:  # handed to the engine thread, behind the step
            time.sleep(0.01)
        third = pool.submit(post).result()  # the queue is full: refused at once
        assert third.status_code == 429
        gate.open.set()
        responses = [first.result(), second.result(), third]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    for r in responses:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 8


def test_sigterm_finishes_running_requests_then_exits_0(tiny_mistral):
    """`mistral-nemo serve` gets SIGTERM with two streams running: the short one finishes,
    the one that outlasts --shutdown-timeout ends with an error event and [DONE], new
    connections are refused, and the process exits 0."""
    port = free_port()
    argv = ["serve", str(tiny_mistral), "--port", str(port), "--shutdown-timeout", "1.5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_nemo", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, base)
        started = threading.Barrier(3)

        def stream(max_tokens: int) -> list[str]:
            body = {"prompt": "Go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            events = []
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if not events:
                            started.wait()
                        events.append(line[6:])
            return events

        with ThreadPoolExecutor(2) as pool:
            short, long = pool.submit(stream, 40), pool.submit(stream, 100_000)
            started.wait(timeout=60)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{base}/health", timeout=1)
            short_events, long_events = short.result(), long.result()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    finals = [json.loads(e) for e in short_events[:-1]]
    assert short_events[-1] == "[DONE]" and finals[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) > 0 for c in finals) > 0
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert "shut down" in error["message"] and error["type"] == "server_error"
