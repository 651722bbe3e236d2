"""The engine on a background thread, fed by many asyncio requests at once.

The engine thread alone touches the Engine. Submissions and aborts reach it through a
thread-safe queue that it drains between steps, so the event loop never waits for a step
(a long prefill chunk): it only puts messages in the queue and awaits answers. The thread
runs steps while any request is unfinished, so every request in flight is batched into the
same forward passes. Each request reads its outputs from its own asyncio queue; a request
that stops listening (a client gone mid-stream) is aborted, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mistral_nemo.engine import Engine, RequestOutput
from mistral_nemo.sampling import SamplingParams

log = logging.getLogger("mistral_nemo.server")

# What a request's asyncio queue receives: its outputs, or the failure of the engine.
Delivery = RequestOutput | BaseException


class EngineError(RuntimeError):
    """The engine failed while running a step; the requests in it were dropped."""


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
        self, request_id: str, outputs: asyncio.Queue[Delivery], abort: Callable[[str], None]
    ) -> None:
        self.request_id = request_id
        self._outputs = outputs
        self._abort = abort

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                out = await self._outputs.get()
                if isinstance(out, BaseException):
                    raise EngineError(str(out)) from out
                yield out
                if out.finished:
                    return
        finally:
            self._abort(self.request_id)  # a no-op for a request that finished


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._listeners: dict[str, _Listener] = {}  # engine thread only
        self.running = 0  # requests in flight, published by the engine thread for /health
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Hand a request to the engine thread and wait until it is accepted; raises
        InvalidRequestError if the engine refuses it (so that a client's error is a 4xx
        before any streaming starts)."""
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[str] = loop.create_future()
        listener = _Listener(loop, asyncio.Queue())
        self._inbox.put(lambda: self._add(prompt, params, listener, accepted))
        request_id = await accepted
        return RequestStream(request_id, listener.outputs, self.abort)

    def abort(self, request_id: str) -> None:
        """Drop a request (its blocks are freed) before the engine's next step."""
        self._inbox.put(lambda: self._drop(request_id))

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
            self.running = len(self._listeners)

    def _add(
        self,
        prompt: list[int],
        params: SamplingParams,
        listener: _Listener,
        accepted: asyncio.Future[str],
    ) -> None:
        try:
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

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug must not take the server down: fail the batch
            log.exception("engine step failed")
            for request_id, failed in list(self._listeners.items()):
                self._drop(request_id)
                failed.send(e)
            return
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if listener is not None and (not listener.send(out) or out.finished):
                self._drop(out.request_id)


def _refuse(accepted: asyncio.Future[str], error: Exception) -> None:
    if not accepted.cancelled():
        accepted.set_exception(error)
