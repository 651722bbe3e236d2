"""The engine on a background thread, fed by many asyncio requests at once.

The engine thread alone touches the Engine. Submissions and aborts reach it through a
thread-safe queue that it drains between steps, so the event loop never waits for a step
(a long prefill chunk): it only puts messages in the queue and awaits answers. The thread
runs steps while any request is unfinished, so every request in flight is batched into the
same forward passes. Each request reads its outputs from its own asyncio queue; a request
that stops listening (a client gone mid-stream) is aborted, which frees its blocks.

Overload and shutdown: with `max_waiting`, a request that finds that many already waiting
for a slot is refused (the client's 429); `drain` refuses new requests (503) and, after a
timeout, fails the ones still running so that their clients hear why.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mistral_nemo.engine import Engine, RequestOutput
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.server.metrics import RequestRecord, ServerMetrics, current_record

log = logging.getLogger("mistral_nemo.server")

# What a request's asyncio queue receives: its outputs, or the failure of the engine.
Delivery = RequestOutput | BaseException


class EngineError(RuntimeError):
    """The engine failed while running a step, or the server stopped; the requests in it
    were dropped."""


class Overloaded(RuntimeError):
    """The waiting queue is full: the client should retry later (429)."""


class ShuttingDown(RuntimeError):
    """The server is draining for shutdown and takes no new requests (503)."""


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    blocks_free: int = 0


@dataclass
class _Listener:
    """The event loop of a request's submitter, and the queue its outputs go to."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Delivery]

    def call(self, callback: Callable[..., object], *args: object) -> bool:
        """Run callback on the listener's loop; False if that loop is closed (nobody
        can read this request any more)."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def send(self, item: Delivery) -> bool:
        return self.call(self.outputs.put_nowait, item)


class RequestStream:
    """The outputs of one accepted request as it advances. Leaving the iteration early
    (a client gone) aborts the request."""

    def __init__(
        self,
        request_id: str,
        outputs: asyncio.Queue[Delivery],
        abort: Callable[[str], None],
        record: RequestRecord | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.request_id = request_id
        self._outputs = outputs
        self._abort = abort
        self._record = record
        self._metrics = metrics

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await self._outputs.get()
                if isinstance(out, BaseException):
                    if self._record is not None:
                        self._record.error = str(out)
                    raise EngineError(str(out)) from out
                self._count(out)
                yield out
                if out.finished:
                    return
        finally:
            self._abort(self.request_id)  # a no-op for a request that finished

    def _count(self, out: RequestOutput) -> None:
        if self._record is None:
            return
        per_token = self._record.tokens_arrived(sum(len(o.token_ids) for o in out.outputs))
        if per_token is not None and self._metrics is not None:
            self._metrics.inter_token(per_token)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        max_waiting: int | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.draining = False
        self._submitting = 0  # event loop only: submitted, not yet accepted or refused
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._listeners: dict[str, _Listener] = {}  # engine thread only
        # Published by the engine thread after each step, for /health and /metrics.
        self.running = 0  # requests in flight
        self.stats = EngineStats(blocks_free=engine.pool.num_free)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Hand a request to the engine thread and wait until it is accepted; raises
        InvalidRequestError if the engine refuses it, Overloaded if the waiting queue is
        full, ShuttingDown while draining (so that the client hears it before any
        streaming starts)."""
        self.check_admission()
        record = current_record.get()
        if record is not None:
            record.prompt_tokens = len(prompt)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[str] = loop.create_future()
        listener = _Listener(loop, asyncio.Queue())
        self._inbox.put(lambda: self._add(prompt, params, listener, accepted))
        self._submitting += 1
        try:
            request_id = await accepted
        finally:
            self._submitting -= 1
        return RequestStream(request_id, listener.outputs, self.abort, record, self.metrics)

    def check_admission(self) -> None:
        """Refuse early, before a request is even encoded: while draining, or when the
        waiting queue looks full (the last published count plus the requests on their way
        to the engine). The engine thread's count at submission is the exact check."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        waiting = self.stats.waiting + self._submitting
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting for a slot already")

    def abort(self, request_id: str) -> None:
        """Drop a request (its blocks are freed) before the engine's next step."""
        self._inbox.put(lambda: self._drop(request_id))

    async def drain(self, timeout: float) -> None:
        """Take no new requests; wait up to `timeout` seconds for those in flight to
        finish, then fail the rest (their streams end with an error event)."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            message = f"the server shut down before the request finished ({timeout:g} s)"
            self._inbox.put(lambda: self._fail_all(ShuttingDown(message)))

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Idle, block until a message comes; busy, take what came during the last step.
            if not self.engine.has_unfinished():
                self._inbox.get()()
            while not self._inbox.empty():
                self._inbox.get()()
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _publish(self) -> None:
        self.running = len(self._listeners)
        waiting = self.engine.num_waiting_requests()
        free = self.engine.pool.num_free
        self.stats = EngineStats(
            max(0, self.running - waiting), waiting, self.engine.pool.num_blocks - free, free
        )

    def _add(
        self,
        prompt: list[int],
        params: SamplingParams,
        listener: _Listener,
        accepted: asyncio.Future[str],
    ) -> None:
        try:
            waiting = self.engine.num_waiting_requests()
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise Overloaded(f"{waiting} requests are waiting for a slot already")
            request_id = self.engine.add_request(prompt, params)
        except Exception as e:  # InvalidRequestError: the client's 4xx; anything else a 500
            listener.call(_refuse, accepted, e)
            return
        self._listeners[request_id] = listener
        if not listener.call(self._accept, accepted, request_id):
            self._drop(request_id)

    def _accept(self, accepted: asyncio.Future[str], request_id: str) -> None:
        """On the event loop. A submitter that is gone (its coroutine was cancelled while
        it waited) will never read the request: abort it."""
        if accepted.cancelled():
            self.abort(request_id)
        else:
            accepted.set_result(request_id)

    def _drop(self, request_id: str) -> None:
        self._listeners.pop(request_id, None)
        self.engine.abort(request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, failed in list(self._listeners.items()):
            self._drop(request_id)
            failed.send(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug must not take the server down: fail the batch
            log.exception("engine step failed")
            self._fail_all(e)
            return
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if listener is not None and (not listener.send(out) or out.finished):
                self._drop(out.request_id)


def _refuse(accepted: asyncio.Future[str], error: Exception) -> None:
    if not accepted.cancelled():
        accepted.set_exception(error)
