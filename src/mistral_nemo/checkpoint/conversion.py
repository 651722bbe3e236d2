"""Rewriting a checkpoint folder in another layout, dtype or quantization, one tensor at a
time."""

from __future__ import annotations

from pathlib import Path

import torch

from mistral_nemo.checkpoint.reading import open_checkpoint
from mistral_nemo.checkpoint.writing import HF_SHARD_BYTES, write_checkpoint
from mistral_nemo.quant import check_scheme


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    layout: str,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    shard_bytes: int = HF_SHARD_BYTES,
) -> None:
    """Rewrite a checkpoint in another layout (and optionally dtype), one tensor at a time."""
    ckpt = open_checkpoint(src)
    write_checkpoint(
        dst, ckpt.config, layout, ckpt.sources(dtype), ckpt.companion_files(), progress, shard_bytes
    )


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    scheme: str,
    group_size: int = 128,
    progress: bool = False,
    shard_bytes: int = HF_SHARD_BYTES,
) -> None:
    """Write a quantized copy of a checkpoint (Hugging Face layout; FP8 as AutoFP8 writes
    it), reading, quantizing and writing one tensor at a time."""
    check_scheme(scheme, group_size)
    ckpt = open_checkpoint(src)
    write_checkpoint(
        dst,
        ckpt.config,
        "hf",
        ckpt.sources(),
        ckpt.companion_files(),
        progress,
        shard_bytes,
        quantize=(scheme, group_size),
    )
