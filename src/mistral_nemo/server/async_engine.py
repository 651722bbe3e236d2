"""The engine on a background thread, fed by many asyncio requests at once.

The thread runs engine steps while any request is unfinished, so every request in flight is
batched into the same forward passes. Each request reads its outputs from its own asyncio
queue; a request that stops listening (a client gone mid-stream) is aborted at once, which
frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from mistral_nemo.engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger("mistral_nemo.server")


class EngineError(RuntimeError):
    """The engine failed while running a step; the requests in it were dropped."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> str:
        """Queue a request; raises InvalidRequestError at once if the engine refuses it."""
        with self._lock:
            request_id = self.engine.add_request(prompt, params)
            self._queues[request_id] = (asyncio.get_running_loop(), asyncio.Queue())
        self._work.set()
        return request_id

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of a submitted request as it advances. Leaving early aborts it."""
        queue = self._queues[request_id][1]
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise EngineError(str(out)) from out
                yield out
                if out.finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                self.engine.abort(request_id)

    @property
    def running(self) -> int:
        return len(self._queues)

    def _run(self) -> None:
        while True:
            self._work.wait()
            with self._lock:
                if not self.engine.has_unfinished():
                    self._work.clear()
                    continue
                try:
                    outputs: list[RequestOutput] = self.engine.step()
                except Exception as e:  # a bug must not take the server down: fail the batch
                    log.exception("engine step failed")
                    for request_id, (loop, queue) in list(self._queues.items()):
                        self.engine.abort(request_id)
                        loop.call_soon_threadsafe(queue.put_nowait, e)
                    continue
                targets = [(self._queues.get(o.request_id), o) for o in outputs]
            for target, out in targets:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
