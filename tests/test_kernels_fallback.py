"""Without the kernels (turned off, or a library built for a machine without AVX-512 or
AVX2) the package imports and generates through torch, the same greedy tokens as with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mistral_nemo import kernels
from mistral_nemo.kernels.build import DEFAULT_FLAGS, FLAGS_VARIABLE

# A fresh interpreter: the kernels' library is chosen once per process. The model is one
# the C decode step takes (fp32, GQA, head_dim != dim / heads).
GENERATE = """
import json

import torch

import mistral_nemo
from mistral_nemo import ModelConfig, Transformer, kernels
from mistral_nemo.generate import generate

config = ModelConfig(
    dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=48, hidden_dim=384,
    vocab_size=512, max_seq_len=64,
)
torch.manual_seed(0)
model = Transformer(config).eval()
tokens = list(generate(model, [5, 77, 300, 12, 9, 401], max_tokens=12, temperature=0))
available = {kind.name: kernels.available(kind) for kind in kernels.WeightKind}
print(json.dumps({"tokens": tokens, "available": available}))
"""


def run(**env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", GENERATE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def with_kernels() -> dict:
    if not kernels.available(torch.float32):
        pytest.skip("no vectorized kernels on this machine: nothing to fall back from")
    out = run()
    assert out["available"]["FP32"]
    return out


def test_turned_off_by_environment(with_kernels):
    out = run(MISTRAL_NEMO_CPU_KERNELS="0")
    assert not any(out["available"].values())
    assert out["tokens"] == with_kernels["tokens"]


def cpu_flags() -> set[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next(
        (set(line.split(":")[1].split()) for line in lines if line.startswith("flags")), set()
    )


@pytest.mark.parametrize("without", ["avx512f", "avx2"])
def test_builds_without_avx512_or_avx2(with_kernels, tmp_path, without):
    """The library of a machine without AVX-512 builds and loads: on an AVX2 CPU with FMA,
    every kind of product (and so the decode step) is vectorized; without AVX2 either, torch
    does every product. The tokens are the same."""
    flags = f"{DEFAULT_FLAGS} -mno-avx512f" + (" -mno-avx2" if without == "avx2" else "")
    out = run(
        **{FLAGS_VARIABLE: flags},
        XDG_CACHE_HOME=str(tmp_path),  # a build of its own, not left in the user's cache
    )
    assert list(tmp_path.glob("mistral-nemo/kernels-*.so"))
    avx2 = without == "avx512f" and {"avx2", "fma"} <= cpu_flags()
    expected = {"BF16": avx2, "FP32": avx2, "FP8": avx2, "INT4": avx2, "INT8": avx2}
    assert out["available"] == expected
    assert out["tokens"] == with_kernels["tokens"]
