"""Running the app under uvicorn with a graceful shutdown: on SIGTERM (or a first Ctrl-C)
the server stops accepting, lets the requests in flight finish, fails those still running
after `shutdown_timeout` (a stream then ends with an error event), and returns."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mistral_nemo.server.async_engine import AsyncEngine


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drained: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
        if self.drained is not None:
            await self.drained

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self.loop is not None:
            self.loop.call_soon_threadsafe(self._drain)
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        self.drained = asyncio.ensure_future(self.engine.drain(self.timeout))


def run_server(
    app: FastAPI, host: str, port: int, shutdown_timeout: float, log_format: str = "text"
) -> None:
    """Serve until SIGTERM, then drain (see the module) and return normally."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(message)s" if log_format == "json" else "%(asctime)s %(message)s")
    )
    requests = logging.getLogger("mistral_nemo.server.requests")
    requests.addHandler(handler)
    requests.setLevel(logging.INFO)
    requests.propagate = False
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(shutdown_timeout) + 5,  # ours ends it first
    )
    # The model, its tokenizer's tables and the libraries are millions of objects that live
    # as long as the server: out of the collector's reach, a full collection under load
    # walks only what requests made (otherwise a pause of a few hundred ms, seen by every
    # client at once).
    gc.collect()
    gc.freeze()
    # uvicorn raises the signal it caught again once it has stopped: a drained server has
    # done what SIGTERM asks, so that second one is ignored and the process exits 0.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        DrainingServer(config, app.state.engine, shutdown_timeout).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
