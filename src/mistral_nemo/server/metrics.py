"""What the server tells operators: Prometheus metrics at /metrics (named as vLLM names
them, under `mistral_nemo:`) and one log line per request.

Each HTTP request to /v1/ gets a `RequestRecord` (in a context variable, so the serving code
and the request's output stream fill it in wherever they run); when the response ends, the
`RequestLog` middleware logs it and counts it by status.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("mistral_nemo.server.requests")

# Latency buckets (seconds): vLLM's, from a few milliseconds to minutes.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0),
    *(2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0)


@dataclass
class RequestRecord:
    """One HTTP request as it goes: filled in by the serving code and the output stream."""

    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    error: str | None = None  # a failure told inside a stream that had started with 200

    def tokens_arrived(self, total: int) -> float | None:
        """Note that the completion has `total` tokens now; the time per new token since the
        last arrival (None for the first)."""
        now, new = time.perf_counter(), total - self.completion_tokens
        if new <= 0:
            return None
        per_token = None if self.last_token is None else (now - self.last_token) / new
        self.first_token = self.first_token or now
        self.last_token, self.completion_tokens = now, total
        return per_token


current_record: ContextVar[RequestRecord | None] = ContextVar("current_record", default=None)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r, p = self.registry, "mistral_nemo:"
        self.running = Gauge(f"{p}num_requests_running", "Requests running", labels, registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests waiting", labels, registry=r)
        self.blocks_used = Gauge(f"{p}kv_cache_blocks_used", "KV blocks used", labels, registry=r)
        self.blocks_free = Gauge(f"{p}kv_cache_blocks_free", "KV blocks free", labels, registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens", labels, registry=r)
        self.generation_tokens = Counter(
            f"{p}generation_tokens", "Generated tokens", labels, registry=r
        )
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "Time to the first token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "Time between tokens",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Time from arrival to the last byte",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            f"{p}http_requests", "HTTP requests by status", [*labels, "status"], registry=r
        )
        self.errors = Counter(
            f"{p}request_errors", "Failed requests by status", [*labels, "status"], registry=r
        )
        self.model_name = model_name

    def set_engine(self, running: int, waiting: int, blocks_used: int, blocks_free: int) -> None:
        m = self.model_name
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        self.blocks_used.labels(m).set(blocks_used)
        self.blocks_free.labels(m).set(blocks_free)

    def inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def finish(self, record: RequestRecord, status: str) -> None:
        m = self.model_name
        self.requests.labels(m, status).inc()
        if not status.startswith("2") or record.error is not None:
            self.errors.labels(m, status).inc()
        if record.request_id is None:
            return  # refused before it reached the engine
        self.prompt_tokens.labels(m).inc(record.prompt_tokens)
        self.generation_tokens.labels(m).inc(record.completion_tokens)
        self.e2e.labels(m).observe(time.perf_counter() - record.start)
        if record.first_token is not None:
            self.ttft.labels(m).observe(record.first_token - record.start)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestLog:
    """ASGI middleware: a RequestRecord for each /v1/ request; when its response ends, one
    log line (text or JSON) and the request counted in the metrics."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, json_lines: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.json_lines = json_lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        record = RequestRecord(scope["method"], scope["path"])
        status = "500"  # unless a response starts

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        token = current_record.set(record)
        try:
            await self.app(scope, receive, watched)
        except BaseException:
            status = "aborted" if status == "500" else status
            raise
        finally:
            current_record.reset(token)
            if record.error is not None:
                status = f"{status}+error"
            self.metrics.finish(record, status)
            self._log(record, status)

    def _log(self, record: RequestRecord, status: str) -> None:
        fields = {
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "status": status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_s": None
            if record.first_token is None
            else round(record.first_token - record.start, 4),
            "total_s": round(time.perf_counter() - record.start, 4),
        }
        if record.error is not None:
            fields["error"] = record.error
        if self.json_lines:
            log.info(json.dumps(fields))
        else:
            log.info(" ".join(f"{k}={v}" for k, v in fields.items()))
