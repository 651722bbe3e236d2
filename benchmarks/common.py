"""Shared helpers for the benchmarks: timing, the machine's memory bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # for tests.data: the multilingual sample is shared with tests


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls (the least disturbed by other load on the machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(tokens: Iterable[object], n: int) -> float:
    """Tokens/s of decode steps alone: the time from a generator's first token (which comes
    after the prefill) to its (n+1)-th, so the prefill's own variation stays out."""
    start = 0.0
    for i, _ in enumerate(tokens):
        if i == 0:
            start = time.perf_counter()
        elif i == n:
            return n / (time.perf_counter() - start)
    raise ValueError(f"the generator stopped before {n + 1} tokens")


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: a reduction over a buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4)
    seconds = best_time(buf.sum, repeats)
    return buf.numel() * 4 / seconds / 1e9


def machine() -> dict[str, object]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def save(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
