"""Writing checkpoint folders in the Mistral or Hugging Face layout, tensor by tensor, from
tensors in our layout (optionally quantizing the linear layers on the way)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from mistral_nemo.checkpoint import layouts
from mistral_nemo.checkpoint.safetensors_io import TensorSource, write
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError
from mistral_nemo.quant import is_linear_weight, layer_scheme
from mistral_nemo.quant.stored import (
    QUANTIZED_LAYERS,
    permute_rows,
    quantization_config,
    quantized_tensors,
    scheme_of,
    stored_shapes,
    stored_tensors,
)

if TYPE_CHECKING:
    from mistral_nemo.model import Transformer

LAYOUTS = ("mistral", "hf")
HF_SHARD_BYTES = 5 * 10**9


def write_checkpoint(
    dst: str | Path,
    config: ModelConfig,
    layout: str,
    sources: dict[str, TensorSource],
    extra_files: dict[str, Path | bytes] | None = None,
    progress: bool = False,
    shard_bytes: int = HF_SHARD_BYTES,
    quantize: tuple[str, int] | None = None,
    layers: Mapping[str, nn.Module] | None = None,
) -> None:
    """Write a checkpoint folder from tensors in our layout, into a temporary folder that is
    renamed to `dst` only once complete. `quantize` (scheme, group size) quantizes the
    linear layers as they are written (Hugging Face layout only), except those given
    already quantized in `layers` (by weight name), whose stored tensors are written as
    they are.

    `extra_files` maps file names to a file to copy or to the bytes to write.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if (quantize is not None or layers) and layout != "hf":
        raise CheckpointError("quantized checkpoints are written in the Hugging Face layout")
    dst = Path(dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise CheckpointError(f"{dst}: already exists; choose a new output path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    bar = tqdm(total=len(sources), desc=f"writing {layout}", unit="tensor", disable=not progress)
    try:
        dtype = Counter(s.dtype for s in sources.values()).most_common(1)[0][0]
        if layout == "mistral":
            write(tmp / "consolidated.safetensors", sources, lambda _: bar.update())
            (tmp / "params.json").write_text(json.dumps(config.to_params(), indent=2) + "\n")
        else:
            _write_hf(
                tmp, config, sources, shard_bytes, lambda _: bar.update(), quantize, layers or {}
            )
            hf_config = config.to_hf(dtype)
            if quantize is not None:
                hf_config["quantization_config"] = quantization_config(*quantize)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                shutil.copyfile(content, tmp / name)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


class _QuantizedOnce:
    """Quantizes one weight once for the several tensors it is stored as, and lets go of
    them as they are written."""

    def __init__(self, produce: Callable[[], torch.Tensor], scheme: str, group_size: int) -> None:
        self.produce, self.scheme, self.group_size = produce, scheme, group_size
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, suffix: str) -> torch.Tensor:
        if not self.tensors:
            self.tensors = quantized_tensors(self.produce(), self.scheme, self.group_size)
        return self.tensors.pop(suffix)


def _write_hf(
    folder: Path,
    config: ModelConfig,
    sources: dict[str, TensorSource],
    shard_bytes: int,
    on_tensor: Callable[[str], None],
    quantize: tuple[str, int] | None,
    layers: Mapping[str, nn.Module],
) -> None:
    hf: dict[str, TensorSource] = {}
    for name, layer in layers.items():
        stored = stored_tensors(layer)
        heads = layouts.rotary_heads(name, config)
        if heads is not None:
            stored = permute_rows(stored, partial(layouts.mistral_to_hf_rows, n_heads=heads))
        base = layouts.hf_name(name).removesuffix(".weight")
        for suffix, t in stored.items():
            hf[f"{base}.{suffix}"] = TensorSource(tuple(t.shape), t.dtype, t.contiguous)
    for name, src in sources.items():
        heads = layouts.rotary_heads(name, config)
        if heads is not None:
            src = TensorSource(
                src.shape,
                src.dtype,
                partial(_to_hf_rows, src.produce, heads),
            )
        if quantize is not None and is_linear_weight(name):
            scheme = layer_scheme(name, quantize[0])
            once = _QuantizedOnce(src.produce, scheme, quantize[1])
            base = layouts.hf_name(name).removesuffix(".weight")
            for suffix, (shape, dtype) in stored_shapes(scheme, src.shape, quantize[1]).items():
                hf[f"{base}.{suffix}"] = TensorSource(shape, dtype, partial(once.get, suffix))
            continue
        hf[layouts.hf_name(name)] = src
    shards: list[dict[str, TensorSource]] = [{}]
    size = total = 0
    for name, src in hf.items():
        nbytes = src.dtype.itemsize * int(torch.Size(src.shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = src
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write(folder / "model.safetensors", shards[0], on_tensor)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write(folder / file, shard, on_tensor)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _to_hf_rows(produce: Callable[[], torch.Tensor], heads: int) -> torch.Tensor:
    return layouts.mistral_to_hf_rows(produce(), heads)


def save_model(
    model: Transformer,
    path: str | Path,
    layout: str = "mistral",
    progress: bool = False,
    extra_files: dict[str, Path | bytes] | None = None,
    dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `model`'s weights and config as a checkpoint folder in `layout`, cast to
    `dtype` (one tensor at a time) when given. A model with quantized linear layers (from
    `quant.calibration.quantize_model`) is written quantized, in the Hugging Face layout.
    `state` gives the tensors instead of `model.state_dict()` (a sharded model's, gathered)."""
    if state is None:
        state = model.state_dict()
    quantized = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZED_LAYERS)
        # A tied head is the embedding table's: the loader quantizes it again.
        and not (name == "output" and model.config.tie_embeddings)
    }

    def produce(name: str) -> torch.Tensor:
        return state[name] if dtype is None else state[name].to(dtype)

    sources = {
        name: TensorSource(shape, dtype or state[name].dtype, partial(produce, name))
        for name, shape in layouts.expected_shapes(model.config).items()
        if name not in quantized
    }
    scheme = None
    if quantized:
        # The layers' scheme (not the head's); a layer whose width the group size does
        # not divide has a smaller group, so the checkpoint's is the largest.
        body = [m for n, m in quantized.items() if n != "output.weight"]
        kinds = [scheme_of(m) for m in body or quantized.values()]
        scheme = (kinds[0][0], max(group for _, group in kinds))
    write_checkpoint(
        path,
        model.config,
        layout,
        sources,
        extra_files,
        progress,
        quantize=scheme,
        layers=quantized,
    )
