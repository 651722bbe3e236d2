"""Writing checkpoint folders in the Mistral or Hugging Face layout, tensor by tensor, from
tensors in our layout (optionally quantizing the linear layers on the way)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mistral_nemo.checkpoint import layouts
from mistral_nemo.checkpoint.safetensors_io import TensorSource, write
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError
from mistral_nemo.quant import is_linear_weight
from mistral_nemo.quant.stored import quantization_config, quantized_tensors, stored_shapes

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
) -> None:
    """Write a checkpoint folder from tensors in our layout, into a temporary folder that is
    renamed to `dst` only once complete. `quantize` (scheme, group size) quantizes the
    linear layers as they are written (Hugging Face layout only).

    `extra_files` maps file names to a file to copy or to the bytes to write.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if quantize is not None and layout != "hf":
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
            _write_hf(tmp, config, sources, shard_bytes, lambda _: bar.update(), quantize)
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
    quantize: tuple[str, int] | None = None,
) -> None:
    hf: dict[str, TensorSource] = {}
    for name, src in sources.items():
        heads = layouts.rotary_heads(name, config)
        if heads is not None:
            src = TensorSource(
                src.shape,
                src.dtype,
                partial(_to_hf_rows, src.produce, heads),
            )
        if quantize is not None and is_linear_weight(name):
            once = _QuantizedOnce(src.produce, *quantize)
            base = layouts.hf_name(name).removesuffix(".weight")
            for suffix, (shape, dtype) in stored_shapes(
                quantize[0], src.shape, quantize[1]
            ).items():
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
) -> None:
    """Write `model`'s weights and config as a checkpoint folder in `layout`."""
    state = model.state_dict()
    sources = {
        name: TensorSource(shape, state[name].dtype, partial(state.__getitem__, name))
        for name, shape in layouts.expected_shapes(model.config).items()
    }
    write_checkpoint(path, model.config, layout, sources, extra_files, progress)
