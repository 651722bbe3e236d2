"""Small random checkpoints in the real file layouts, with the real NeMo tokenizer file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.train.config import TrainConfig, load_config

torch.set_num_threads(2)

# Like NeMo: GQA and head_dim != dim / n_heads (here 32 vs 16).
TINY = ModelConfig.preset("tiny")
# Plain multi-head attention with head_dim == dim / n_heads, another RoPE base, 3 layers.
MHA = ModelConfig(
    dim=96,
    n_layers=3,
    n_heads=4,
    n_kv_heads=4,
    head_dim=24,
    hidden_dim=160,
    vocab_size=131072,
    rope_theta=10_000.0,
    norm_eps=1e-6,
)
CONFIGS = {"tiny": TINY, "mha": MHA}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """fp32 random checkpoints keyed by (config name, layout)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, config in CONFIGS.items():
        for layout in ("hf", "mistral"):
            path = root / f"{name}-{layout}"
            init_random(path, config, layout, seed=7, dtype=torch.float32)
            out[name, layout] = path
    return out


@pytest.fixture(scope="session")
def tiny_hf(checkpoints: dict[tuple[str, str], Path]) -> Path:
    return checkpoints["tiny", "hf"]


@pytest.fixture(scope="session")
def tiny_mistral(checkpoints: dict[tuple[str, str], Path]) -> Path:
    return checkpoints["tiny", "mistral"]


# Training runs of the tiny models: a small corpus and settings a few steps long.
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [json.dumps({"text": TEXT * (1 + i % 3) + f"Document {i}."}) for i in range(24)]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_settings(model: Path, out: Path, corpus: Path, **overrides: object) -> TrainConfig:
    values = train_values(model, out, corpus, **overrides)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def train_values(model: Path, out: Path, corpus: Path, **overrides: object) -> dict[str, object]:
    """The settings of `train_settings` as key: value (for a command line)."""
    return {
        "model": str(model),
        "output_dir": str(out),
        "data": [str(corpus)],
        "seq_len": 32,
        "batch_size": 2,
        "steps": 6,
        "warmup_steps": 2,
        "lr": 3e-3,
        "precision": "fp32",
        "cache_dir": str(out.parent / "token-cache"),
        **overrides,
    }


def logged_losses(run: Path) -> list[float]:
    """The losses a training run logged to `run/log.jsonl`, step by step."""
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
