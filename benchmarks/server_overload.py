"""The server under a storm: many concurrent streaming clients against `mistral-nemo serve
--max-waiting N`, then a SIGTERM in the middle of another storm.

    python benchmarks/server_overload.py [--model PATH] [--clients 512] [--max-waiting 64]
                                         [--max-num-seqs 64] [--max-tokens 32]

The model is a random checkpoint of the tiny preset (NeMo's vocabulary) unless --model
names one. Goals (the server issue): no 5xx; every response complete or a 429 with
Retry-After; /health and /metrics answering within 100 ms throughout (probed every 50 ms);
the server's RSS flat after the storm (later storms end where the first did); after a
SIGTERM during load, every accepted request complete and the process exits 0.
Writes benchmarks/results/server_overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing import Queue
from pathlib import Path

import httpx
import psutil
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint.random_init import init_random
from tests.serve_process import wait_for_server


@dataclass
class Storm:
    complete: int = 0
    refused_429: int = 0
    refused_other: list[str] = field(default_factory=list)  # 503, connection refused
    incomplete: list[str] = field(default_factory=list)  # accepted, then lost
    server_errors: list[str] = field(default_factory=list)  # 5xx
    probe_ms: list[float] = field(default_factory=list)


async def one_client(client: httpx.AsyncClient, i: int, max_tokens: int, storm: Storm) -> None:
    body = {
        "messages": [{"role": "user", "content": f"Client {i}: tell me a story."}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                await r.aread()
                error = json.loads(r.text)["error"]
                if "retry-after" in r.headers and error["type"] == "rate_limit_error":
                    storm.refused_429 += 1
                else:
                    storm.incomplete.append(f"429 without Retry-After: {r.text}")
                return
            if r.status_code >= 500:
                await r.aread()
                (storm.refused_other if r.status_code == 503 else storm.server_errors).append(
                    f"{r.status_code} {r.text[:200]}"
                )
                return
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    except httpx.TransportError as e:  # connections refused once a shutdown began
        storm.refused_other.append(type(e).__name__)
        return
    finished = [
        json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1] if '"choices"' in e
    ]
    if events and events[-1] == "[DONE]" and finished and finished[-1] == "length":
        storm.complete += 1
    else:
        storm.incomplete.append(" | ".join(events[-2:])[:300])


def probe(
    base: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    out: Queue[float],
) -> None:
    """/health and /metrics every 50 ms, from a process of its own (the clients' event loop
    would add its own delays), on a connection opened before the storm, as a monitor's is.
    A monitor runs on another machine: here it runs ahead of the clients and the server
    where the OS allows (as root), so that its own waits for a core do not count as the
    server's."""
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    with httpx.Client(base_url=base, timeout=10) as client:
        client.get("/health").raise_for_status()
        ready.set()
        while not stop.is_set():
            for path in ("/health", "/metrics"):
                start = time.perf_counter()
                try:
                    client.get(path).raise_for_status()
                except httpx.HTTPError:
                    return  # the server is shutting down
                out.put(1000 * (time.perf_counter() - start))
            time.sleep(0.05)


async def storm(
    base: str, clients: int, max_tokens: int, sigterm: subprocess.Popen[str] | None = None
) -> Storm:
    result = Storm()
    ready, stop, latencies = multiprocessing.Event(), multiprocessing.Event(), Queue()
    prober = multiprocessing.Process(target=probe, args=(base, ready, stop, latencies))
    prober.start()
    ready.wait(timeout=60)
    # The clients stand for other machines: on the cores they share with the server here,
    # they yield to it and to the prober, so that the latency measured is the server's.
    os.setpriority(os.PRIO_PROCESS, 0, 10)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        tasks = [
            asyncio.create_task(one_client(client, i, max_tokens, result)) for i in range(clients)
        ]
        if sigterm is not None:
            await asyncio.sleep(1.0)
            sigterm.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    stop.set()
    prober.join()
    while not latencies.empty():
        result.probe_ms.append(latencies.get())
    return result


def start_server(model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    argv = [
        *(sys.executable, "-m", "mistral_nemo", "serve", str(model), "--port", str(port)),
        *("--max-waiting", str(args.max_waiting), "--max-num-seqs", str(args.max_num_seqs)),
        *("--shutdown-timeout", "120", "--kv-cache-memory", "2GiB"),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, text=True)
    wait_for_server(proc, f"http://127.0.0.1:{port}")
    return proc


def summary(name: str, s: Storm, rss_mib: float) -> dict[str, object]:
    probes = sorted(s.probe_ms)
    return {
        "storm": name,
        "complete": s.complete,
        "429": s.refused_429,
        "refused at shutdown": len(s.refused_other),
        "lost": len(s.incomplete),
        "5xx": len(s.server_errors),
        "probes": len(probes),
        "probe p50 ms": probes[len(probes) // 2] if probes else None,
        "probe p99 ms": probes[len(probes) * 99 // 100] if probes else None,
        "probe max ms": probes[-1] if probes else None,
        "probes over 100 ms": sum(p > 100 for p in probes),
        "server RSS MiB": round(rss_mib, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=512)
    parser.add_argument("--max-waiting", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "tiny"
        if not args.model:
            init_random(model, ModelConfig.preset("tiny"), "hf", seed=0)
        base = f"http://127.0.0.1:{args.port}"
        proc = start_server(model, args.port, args)
        rss = lambda: psutil.Process(proc.pid).memory_info().rss / 2**20  # noqa: E731
        rows = []
        try:
            asyncio.run(storm(base, 8, args.max_tokens))  # warm up
            rss_before = rss()
            for name in ("storm 1", "storm 2", "storm 3"):
                result = asyncio.run(storm(base, args.clients, args.max_tokens))
                rows.append(summary(name, result, rss()))
                print(table(rows[-1:], list(rows[-1])), flush=True)
                for problem in result.incomplete[:3] + result.server_errors[:3]:
                    print("  ", problem)
            result = asyncio.run(storm(base, args.clients, args.max_tokens, sigterm=proc))
            code = proc.wait(timeout=300)
            rows.append({**summary("storm + SIGTERM", result, float("nan")), "exit code": code})
        finally:
            if proc.poll() is None:
                proc.kill()
    print(table(rows, list(rows[-1])))
    after = ", ".join(f"{r['server RSS MiB']} after {r['storm']}" for r in rows[:3])
    print(f"RSS: {rss_before:.0f} MiB before, {after}")
    save(
        "server_overload",
        {"config": vars(args), "rss_before_mib": round(rss_before, 1), "rows": rows},
    )


if __name__ == "__main__":
    main()
