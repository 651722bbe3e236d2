"""Random checkpoints in the real layouts, for tests, demos and benchmarks.

Tensors are generated one at a time while being written, so even a full-size NeMo 12B
checkpoint is produced without holding the model in memory.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from mistral_nemo.checkpoint import layouts
from mistral_nemo.checkpoint.reading import RANDOM_MARKER
from mistral_nemo.checkpoint.safetensors_io import TensorSource
from mistral_nemo.checkpoint.writing import write_checkpoint
from mistral_nemo.config import ModelConfig
from mistral_nemo.tokenizer.files import reference_tekken_file

_ROWS_PER_CHUNK = 4096


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    """Weights with the scale of a trained model: unit-variance activations through every
    layer, and norm gains spread around 1 so that a mixed-up norm cannot go unnoticed."""
    if name.endswith("norm.weight"):
        return (torch.rand(shape, generator=generator) + 0.5).to(dtype)
    std = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], _ROWS_PER_CHUNK):
        rows = min(_ROWS_PER_CHUNK, shape[0] - start)
        out[start : start + rows] = torch.randn((rows, *shape[1:]), generator=generator) * std
    return out


def init_random(
    out: str | Path,
    config: ModelConfig,
    layout: str = "mistral",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> None:
    """Write a random checkpoint of `config` with the real NeMo tokenizer file beside it."""
    tekken = reference_tekken_file()
    note = (
        f"Random weights (seed {seed}), not a trained model: generated text is noise. "
        "Written by `mistral-nemo init-random`.\n"
    )

    def produce(index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return random_tensor(name, shape, dtype, generator)

    sources = {
        name: TensorSource(shape, dtype, partial(produce, i, name, shape))
        for i, (name, shape) in enumerate(layouts.expected_shapes(config).items())
    }
    write_checkpoint(
        out,
        config,
        layout,
        sources,
        progress=progress,
        extra_files={"tekken.json": tekken, RANDOM_MARKER: note.encode()},
    )
