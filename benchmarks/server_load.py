"""Load test: many concurrent streaming clients against `mistral-nemo serve` on loopback.

    python benchmarks/server_load.py [--clients 32] [--seconds 60] [--max-tokens 32]

Starts the server in its own process on a random `tiny` checkpoint, asks each of a set of
prompts alone (greedy) for reference, then runs `--clients` clients that stream greedy
chat completions back to back for `--seconds`. Reports errors, completions that differ from
the same request sent alone, requests/s and time-to-first-token percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint.random_init import init_random
from tests.serve_process import wait_for_server

MODEL = "nemo-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, float]:
    """The streamed text of one greedy chat completion and its time to first token."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - start
                text += piece
    return text, ttft if ttft is not None else time.perf_counter() - start


async def run(
    base: str, prompts: list[str], clients: int, seconds: float, max_tokens: int
) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        reference = {p: (await stream_chat(client, p, max_tokens))[0] for p in prompts}
        ttfts: list[float] = []
        errors: list[str] = []
        mismatches = 0
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal mismatches, done
            i = k
            while time.perf_counter() < deadline:
                prompt = prompts[i % len(prompts)]
                i += clients
                try:
                    text, ttft = await stream_chat(client, prompt, max_tokens)
                except Exception as e:  # counted, reported
                    errors.append(str(e))
                    continue
                ttfts.append(ttft)
                mismatches += text != reference[prompt]
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    ttfts.sort()
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": done,
        "errors": len(errors),
        "mismatches": mismatches,
        "req_s": done / elapsed,
        "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = [f"Question {i}: tell me about topic number {i * 7}." for i in range(48)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        # fp32: in bf16, batching changes the rounding of near-tied logits.
        init_random(path, ModelConfig.preset("tiny"), "mistral", seed=0, dtype=torch.float32)
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mistral_nemo.cli",
                "serve",
                str(path),
                "--port",
                str(port),
                "--served-model-name",
                MODEL,
                "--kv-cache-memory",
                "1GiB",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(server, base)
            result = asyncio.run(run(base, prompts, args.clients, args.seconds, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(table([result], list(result)))
    print(f"wrote {save('server_load', result)}")


if __name__ == "__main__":
    main()
