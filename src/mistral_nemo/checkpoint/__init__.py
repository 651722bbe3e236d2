"""Checkpoints: folders in the Mistral (params.json + consolidated.safetensors) and Hugging
Face (config.json + model[-K-of-N].safetensors) layouts, and llama.cpp's GGUF files: open,
validate, load, write, convert."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mistral_nemo.checkpoint import layouts
from mistral_nemo.checkpoint.gguf_file import (
    GGUFFile,
    GGUFTensor,
    gguf_tensors,
    is_gguf,
    write_gguf,
)
from mistral_nemo.checkpoint.safetensors_io import LazyTensor, TensorSource, scan, write
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError
from mistral_nemo.model import Transformer
from mistral_nemo.quant import check_scheme, is_linear_weight, quantize_linear
from mistral_nemo.quant.stored import (
    COMPANIONS,
    MISTRAL_NAMES,
    layer_from_stored,
    permute_rows,
    quantization_config,
    quantized_tensors,
    scheme_from_config,
    stored_shapes,
)

LAYOUTS = ("mistral", "hf")
StoredTensor = LazyTensor | GGUFTensor
# A file saying the weights are random, so tools can label their output as noise.
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
# Files other than weights and config that travel with a checkpoint when it is converted.
COMPANION_FILES = ("tekken.json", RANDOM_MARKER)
HF_SHARD_BYTES = 5 * 10**9
# Non-weight tensors some older HF checkpoints carry; safe to ignore.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    """An opened, validated checkpoint folder; tensors by Mistral name, not yet read."""

    path: Path
    layout: str
    config: ModelConfig
    tensors: dict[str, StoredTensor]
    # For quantized checkpoints: (scheme, group size), and the companion tensors of each
    # quantized weight (scales), by weight name and suffix.
    quant: tuple[str, int] | None = None
    companions: dict[str, dict[str, StoredTensor]] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the weights are stored in."""
        counts = Counter(t.dtype for t in self.tensors.values())
        return counts.most_common(1)[0][0]

    def load(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Tensor `name` in our (Mistral) layout; a zero-copy memory map when nothing changes."""
        t = self.tensors[name].load()
        heads = layouts.rotary_heads(name, self.config)
        if self.layout == "hf" and heads is not None:
            t = layouts.hf_to_mistral_rows(t, heads)
        return t.to(device=device, dtype=dtype or t.dtype)

    def load_quantized(self, name: str, device: torch.device | str = "cpu") -> nn.Module:
        """The quantized linear layer stored under weight `name` and its companions."""
        assert self.quant is not None
        stored = {"weight": self.tensors[name].load()}
        stored.update({k: t.load() for k, t in self.companions.get(name, {}).items()})
        heads = layouts.rotary_heads(name, self.config)
        if self.layout == "hf" and heads is not None:
            stored = permute_rows(stored, partial(layouts.hf_to_mistral_rows, n_heads=heads))
        stored = {k: t.to(device) for k, t in stored.items()}
        return layer_from_stored(stored, *self.quant, where=f"{self.tensors[name].file}: {name}")

    def sources(self, dtype: torch.dtype | None = None) -> dict[str, TensorSource]:
        if self.layout == "gguf":
            raise CheckpointError(
                f"{self.path}: converting a GGUF file to a checkpoint folder is not supported; "
                "load it with from_pretrained or LLM"
            )
        if self.quant is not None:
            raise CheckpointError(
                f"{self.path}: is quantized ({self.quant[0]}); convert the "
                "unquantized checkpoint instead"
            )
        return {
            name: TensorSource(t.shape, dtype or t.dtype, partial(self.load, name, dtype))
            for name, t in self.tensors.items()
        }

    def companion_files(self) -> dict[str, Path | bytes]:
        return {f: self.path / f for f in COMPANION_FILES if (self.path / f).is_file()}


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_gguf(path):
        return _open_gguf(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: expected a checkpoint folder (Mistral or Hugging Face layout) or a .gguf file"
        )
    config = ModelConfig.from_dir(path)
    layout = "mistral" if (path / "params.json").is_file() else "hf"
    raw = json.loads((path / ("params.json" if layout == "mistral" else "config.json")).read_text())
    quant = scheme_from_config(raw)
    tensors: dict[str, StoredTensor] = dict(
        _read_mistral(path) if layout == "mistral" else _read_hf(path)
    )
    companions: dict[str, dict[str, StoredTensor]] = {}
    for name in [n for n in tensors if n.rsplit(".", 1)[-1] in COMPANIONS]:
        base, suffix = name.rsplit(".", 1)
        companions.setdefault(f"{base}.weight", {})[suffix] = tensors.pop(name)
    if companions and quant is None:
        raise CheckpointError(f"{path}: has quantization scales but no quantization config")
    _validate(path, config, tensors, quant)
    order = layouts.expected_shapes(config)
    return Checkpoint(
        path, layout, config, {name: tensors[name] for name in order}, quant, companions
    )


def _open_gguf(path: Path) -> Checkpoint:
    file = GGUFFile(path)
    config = file.config()
    tensors: dict[str, StoredTensor] = dict(gguf_tensors(file))
    _validate(path, config, tensors, None)
    order = layouts.expected_shapes(config)
    return Checkpoint(path, "gguf", config, {name: tensors[name] for name in order})


def _read_mistral(path: Path) -> dict[str, LazyTensor]:
    files = sorted(path.glob("consolidated*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.safetensors")
    tensors = _merge(scan(f) for f in files)
    renamed = {}
    for name, t in tensors.items():  # Mistral's FP8 scale names
        base, _, suffix = name.rpartition(".")
        renamed[f"{base}.{MISTRAL_NAMES.get(suffix, suffix)}"] = t
    return renamed


def _read_hf(path: Path) -> dict[str, LazyTensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing_files = [f for f in files if not f.is_file()]
        if missing_files:
            raise CheckpointError(f"{index}: lists {missing_files[0].name}, which is missing")
    elif (path / "model.safetensors").is_file():
        files, weight_map = [path / "model.safetensors"], None
    else:
        files, weight_map = sorted(path.glob("model-*-of-*.safetensors")), None
        if not files:
            raise CheckpointError(
                f"{path}: config.json found but no model.safetensors, "
                "model.safetensors.index.json or model-*-of-*.safetensors"
            )
    hf_tensors = _merge(scan(f) for f in files)
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in hf_tensors or hf_tensors[name].file.name != file:
                raise CheckpointError(
                    f"{path / file}: tensor {name!r} listed in the index is not in this file"
                )
    out = {}
    for name, t in hf_tensors.items():
        base, _, suffix = name.rpartition(".")
        if suffix in COMPANIONS:  # a quantized layer's scales
            ours = layouts.mistral_name(f"{base}.weight")
            if ours is not None:
                out[f"{ours.removesuffix('.weight')}.{suffix}"] = t
                continue
        ours = layouts.mistral_name(name)
        if ours is None:
            if name.endswith(_HF_IGNORED_SUFFIXES):
                continue
            raise CheckpointError(f"{t.file}: unexpected tensor {name!r}")
        out[ours] = t
    return out


def _merge(per_file: Iterable[dict[str, LazyTensor]]) -> dict[str, LazyTensor]:
    out: dict[str, LazyTensor] = {}
    for tensors in per_file:
        for name, t in tensors.items():
            if name in out:
                raise CheckpointError(f"tensor {name!r} is in both {out[name].file} and {t.file}")
            out[name] = t
    return out


def _validate(
    path: Path,
    config: ModelConfig,
    tensors: dict[str, StoredTensor],
    quant: tuple[str, int] | None,
) -> None:
    expected = layouts.expected_shapes(config)
    if quant is not None:
        for name, shape in expected.items():
            if is_linear_weight(name):
                expected[name] = stored_shapes(quant[0], shape, quant[1])["weight"][0]
    if config.tie_embeddings:
        tensors.pop("output.weight", None)  # some tied checkpoints store the copy anyway
    for name, t in tensors.items():
        if name not in expected:
            raise CheckpointError(
                f"{t.file}: unexpected tensor {name!r} (not part of a "
                f"{config.n_layers}-layer model)"
            )
        if t.shape != expected[name]:
            raise CheckpointError(
                f"{t.file}: tensor {name!r} has shape {list(t.shape)}, "
                f"the config implies {list(expected[name])}"
            )
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")


# -- loading -------------------------------------------------------------------------------


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    quantize: str | None = None,
    group_size: int = 128,
) -> Transformer:
    """Build a Transformer on the meta device, then assign each tensor as it is read.

    On CPU in the file's dtype the weights stay memory-mapped (no copy at all); otherwise
    each tensor is converted on its own, so peak memory is the result plus one tensor. With
    `quantize`, each linear weight is quantized as it is read and its source dropped.
    """
    if quantize is not None:
        check_scheme(quantize, group_size)
    ckpt = open_checkpoint(path)
    if quantize is not None and ckpt.quant is not None:
        raise CheckpointError(f"{path}: is already quantized ({ckpt.quant[0]})")
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    state = {}
    for name in tqdm(ckpt.tensors, desc="loading", unit="tensor", disable=not progress):
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        if ckpt.quant is not None and is_linear_weight(name):
            setattr(model.get_submodule(parent), attr, ckpt.load_quantized(name, device))
        elif quantize and is_linear_weight(name):
            weight = ckpt.load(name, device=device)
            layer = quantize_linear(weight, quantize, group_size)
            setattr(model.get_submodule(parent), attr, layer)
            del weight
        else:
            state[name] = ckpt.load(name, dtype, device)
    if ckpt.config.tie_embeddings and quantize:
        # The LM head reads the whole table every token: a quantized copy of it pays.
        head = quantize_linear(state["tok_embeddings.weight"], quantize, group_size)
        setattr(model, "output", head)  # noqa: B010 (a quantized layer, not a Linear)
    elif ckpt.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(not t.is_meta for t in model.state_dict().values()), missing
    if quantize is not None or ckpt.quant is not None:
        model.fuse_projections()
    return model.eval().requires_grad_(False)


# -- writing -------------------------------------------------------------------------------


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
    state = model.state_dict()
    sources = {
        name: TensorSource(shape, state[name].dtype, partial(state.__getitem__, name))
        for name, shape in layouts.expected_shapes(model.config).items()
    }
    write_checkpoint(path, model.config, layout, sources, extra_files, progress)


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


def export_gguf(
    src: str | Path, dst: str | Path, tensor_type: str = "bf16", progress: bool = False
) -> None:
    """Write a checkpoint folder as a llama.cpp GGUF file (architecture `llama`, NeMo's
    Tekken tokenizer as llama.cpp's converter writes it), one tensor at a time."""
    from mistral_nemo.tokenizer import Tokenizer
    from mistral_nemo.tokenizer.gguf_vocab import add_tekken_metadata

    ckpt = open_checkpoint(src)
    if ckpt.layout == "gguf" or ckpt.quant is not None:
        raise CheckpointError(f"{src}: export to GGUF starts from an unquantized checkpoint folder")
    tokenizer = Tokenizer.from_pretrained(src)

    def metadata(writer: Any) -> None:
        writer.add_name(Path(src).name)
        add_tekken_metadata(writer, tokenizer)

    tensors = {name: (t.shape, partial(ckpt.load, name)) for name, t in ckpt.tensors.items()}
    with tqdm(total=len(tensors), desc="writing gguf", unit="tensor", disable=not progress) as bar:
        write_gguf(dst, ckpt.config, tensors, tensor_type, metadata, lambda _: bar.update())


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
