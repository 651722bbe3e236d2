"""Waiting for a `mistral-nemo serve` subprocess to answer (tests and benchmarks)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_for_server(proc: subprocess.Popen[str], base: str, seconds: float = 120.0) -> None:
    """Return once the server at `base` answers /health; raise if its process exits first
    (with the end of its stderr, when piped) or if it does not answer within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=1)
            return
        except httpx.HTTPError:
            if proc.poll() is not None:
                said = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise RuntimeError(f"the server exited ({proc.returncode}): {said}") from None
            time.sleep(0.1)
    raise RuntimeError(f"the server did not answer within {seconds:g} s")
