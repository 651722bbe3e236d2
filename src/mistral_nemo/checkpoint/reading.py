"""Opening a checkpoint: a folder in the Mistral (params.json + consolidated.safetensors) or
Hugging Face (config.json + model[-K-of-N].safetensors) layout, or a GGUF file, validated
against its config and with its tensors by Mistral name, not yet read."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from mistral_nemo.checkpoint import layouts
from mistral_nemo.checkpoint.gguf_file import GGUFFile, GGUFTensor, gguf_tensors, is_gguf
from mistral_nemo.checkpoint.safetensors_io import LazyTensor, TensorSource, scan
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError
from mistral_nemo.quant import is_linear_weight, layer_scheme
from mistral_nemo.quant.stored import (
    COMPANIONS,
    MISTRAL_NAMES,
    layer_from_stored,
    permute_rows,
    scheme_from_config,
    stored_shapes,
)

StoredTensor = LazyTensor | GGUFTensor
# A file saying the weights are random, so tools can label their output as noise.
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
# A tokenizer as transformers saves it, which fine-tunes ship in place of tekken.json.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Files other than weights and config that travel with a checkpoint when it is converted.
COMPANION_FILES = ("tekken.json", *HF_TOKENIZER_FILES, "generation_config.json", RANDOM_MARKER)
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
    """Open and validate a checkpoint folder or GGUF file; no tensor is read yet."""
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
        head = tensors.get("output.weight")
        for name, shape in expected.items():
            if is_linear_weight(name):
                scheme = layer_scheme(name, quant[0])
                as_layers = stored_shapes(quant[0], shape, quant[1])["weight"][0]
                if name == "output.weight" and head is not None and head.shape == as_layers:
                    scheme = quant[0]  # written before an int4 model's head was kept in int8
                expected[name] = stored_shapes(scheme, shape, quant[1])["weight"][0]
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
