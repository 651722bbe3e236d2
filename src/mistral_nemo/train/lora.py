"""LoRA (Hu et al. 2021) and QLoRA: low-rank adapters trained beside frozen linear layers.

A target layer W, plain or quantized by `mistral_nemo.quant` (QLoRA), computes
W x + B A dropout(x) · alpha / rank, with A [rank, in] Kaiming-uniform and B [out, rank]
zero as PEFT initialises them, so a new adapter changes nothing until trained. `add_lora`
freezes everything else: only A and B train, and the base weights are never written to.
`merge_lora` folds the adapters back into plain linear layers for inference and export.
Adapters are saved and loaded in PEFT's format (`peft_format`).

Adapters are kept in fp32 whatever the base's dtype (PEFT does the same): in bf16 the
small updates of a low-rank matrix would round away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo.checkpoint import open_checkpoint
from mistral_nemo.errors import CheckpointError, ConfigError
from mistral_nemo.model import Transformer
from mistral_nemo.quant import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    check_scheme,
    is_linear_weight,
    layer_scheme,
    quantize_linear,
)
from mistral_nemo.train.peft_format import read_adapter, write_adapter

# The linear layers of each block (model.py's names), the modules LoRA can target.
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# The layers an adapter can sit beside: full precision, or quantized for QLoRA.
BASE_TYPES = (nn.Linear, Fp8Linear, Int8Linear, Int4Linear)
BaseLinear = nn.Linear | Fp8Linear | Int8Linear | Int4Linear


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only, as PEFT's lora_dropout
    target_modules: tuple[str, ...] = LINEAR_NAMES

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or any(t not in LINEAR_NAMES for t in self.target_modules):
            raise ConfigError(
                f"LoRA target modules {list(self.target_modules)}: "
                f"choose from {', '.join(LINEAR_NAMES)}"
            )


class LoraLinear(nn.Module):
    """`base`, frozen, plus the trainable low-rank update B A dropout(x) · alpha / rank."""

    def __init__(self, base: BaseLinear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout)  # p = 0 returns its input untouched
        a = torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(a.new_zeros(base.out_features, rank))
        # nn.Linear's own initialisation, as PEFT gives A: uniform within 1 / sqrt(in).
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast both matmuls run in bf16 on x as it is; a cast here would make
            # (and save for backward) an fp32 copy of every adapted layer's input.
            x_lora = x_lora.to(self.lora_a.dtype)
        update = F.linear(F.linear(x_lora, self.lora_a), self.lora_b) * self.scaling
        out = self.base(x)
        # In the base's output dtype (bf16 under autocast, even for an fp32 input), as the
        # layer without its adapter would give.
        return out + update.to(out.dtype)

    @torch.no_grad()
    def merged(self, dtype: torch.dtype) -> nn.Linear:
        """A plain linear layer in `dtype` computing what this one does (a quantized base is
        dequantized first, so the result holds its rounding plus the exact update)."""
        weight = dense_weight(self.base) + (self.lora_b @ self.lora_a) * self.scaling
        layer = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        return layer


def dense_weight(layer: BaseLinear) -> torch.Tensor:
    """The fp32 weight [out, in] of a plain or quantized linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    # The quantized layers' own dequantization, the one their forward uses.
    return layer.dequantize(0, layer.out_features)


def target_layers(model: Transformer, config: LoraConfig) -> dict[str, BaseLinear]:
    """The layers of `model` that `config` puts adapters beside, by name."""
    layers = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in config.target_modules:
            continue
        if not isinstance(module, BASE_TYPES):
            what = "already has an adapter" if isinstance(module, LoraLinear) else "is not linear"
            raise ConfigError(f"cannot add a LoRA adapter to {name}: it {what}")
        layers[name] = module
    return layers


def add_lora(model: Transformer, config: LoraConfig) -> Transformer:
    """Freeze every parameter of `model` and put a trainable adapter beside each target
    layer of every block (in place). Returns `model`."""
    model.requires_grad_(False)
    for name, base in target_layers(model, config).items():
        parent, _, attr = name.rpartition(".")
        adapted = LoraLinear(base, config.rank, config.alpha, config.dropout)
        setattr(model.get_submodule(parent), attr, adapted)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers of `model` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_config(model: nn.Module) -> LoraConfig:
    """The settings of the adapters in `model` (one set for all), its targets those adapted."""
    layers = lora_layers(model)
    settings = {(m.rank, m.alpha, m.dropout.p) for m in layers.values()}
    if len(settings) != 1:
        raise ConfigError("adapters differ in settings" if settings else "the model has no LoRA")
    ((rank, alpha, dropout),) = settings
    adapted = {name.rpartition(".")[2] for name in layers}
    return LoraConfig(rank, alpha, dropout, tuple(t for t in LINEAR_NAMES if t in adapted))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their names in `model.state_dict()` (`...wq.lora_a`)."""
    return {
        f"{name}.{attr}": getattr(layer, attr).detach()
        for name, layer in lora_layers(model).items()
        for attr in ("lora_a", "lora_b")
    }


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its layer, which becomes a plain `nn.Linear` in the model's
    dtype (in place). A quantized base is merged into its dequantized weight: the layer
    leaves quantization behind and takes the memory of the full-precision weight.
    Returns `model`."""
    for name, layer in lora_layers(model).items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer.merged(model.dtype))
    return model


def save_adapter(
    model: Transformer,
    path: str | Path,
    base_model: str | Path | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapters of `model` as a PEFT adapter folder at `path`, atomically (an
    adapter folder already there is replaced). `base_model` is recorded as the config's
    base_model_name_or_path. `tensors` gives the adapters' tensors by name instead of
    `model`'s own (a sharded model's, gathered)."""
    write_adapter(
        Path(path),
        asdict(lora_config(model)),
        adapter_state_dict(model) if tensors is None else tensors,
        model.config,
        None if base_model is None else str(base_model),
    )


def load_adapter(model: Transformer, path: str | Path) -> Transformer:
    """Add the adapter saved at `path` (PEFT's format, written by us or by peft) to `model`,
    in place, trainable as after `add_lora`. Returns `model`."""
    return _add_adapter(model, *read_adapter(path, model.config), Path(path))


def _add_adapter(
    model: Transformer, settings: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> Transformer:
    """`load_adapter` of what `read_adapter` found at `path`."""
    config = LoraConfig(**settings)
    shapes = {}
    for name, base in target_layers(model, config).items():
        shapes[f"{name}.lora_a"] = (config.rank, base.in_features)
        shapes[f"{name}.lora_b"] = (base.out_features, config.rank)
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if wrong := sorted(n for n in shapes.keys() | found.keys() if shapes.get(n) != found.get(n)):
        raise CheckpointError(
            f"{path}: the adapter does not fit this model ({len(wrong)} tensors missing, "
            f"unexpected or of another shape, e.g. {wrong[0]})"
        )
    add_lora(model, config)
    with torch.no_grad():
        for name, tensor in tensors.items():
            model.get_parameter(name).copy_(tensor)
    return model


def load_merged(
    path: str | Path,
    adapter: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
    group_size: int = 128,
    progress: bool = False,
) -> Transformer:
    """The checkpoint at `path` with the adapter at `adapter` merged into its weights, ready
    for the runtime (what `--lora` loads). With `quantize`, the model is loaded in full
    precision, merged, and only then quantized, layer by layer as `from_pretrained` would
    do it: the full-precision model is in memory once, where `from_pretrained` alone
    quantizes each weight as it reads it."""
    if quantize is not None:
        check_scheme(quantize, group_size)
    found = read_adapter(adapter, open_checkpoint(path).config)  # before the weights load
    model = Transformer.from_pretrained(path, dtype=dtype, device=device, progress=progress)
    merge_lora(_add_adapter(model, *found, Path(adapter)))
    if quantize is not None:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and is_linear_weight(f"{name}.weight"):
                parent, _, attr = name.rpartition(".")
                layer = quantize_linear(module.weight, layer_scheme(name, quantize), group_size)
                setattr(model.get_submodule(parent), attr, layer)
    return model


def merge_checkpoint(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    layout: str | None = None,
    progress: bool = False,
) -> None:
    """Write `base` with `adapter` merged in as a normal checkpoint folder at `out`, in
    `layout` ("hf" or "mistral"; default: the base's), in the base's dtype, its tokenizer
    files beside it."""
    ckpt = open_checkpoint(base)
    if ckpt.layout == "gguf" or ckpt.quant is not None:
        raise CheckpointError(f"{base}: merging needs an unquantized checkpoint folder")
    found = read_adapter(adapter, ckpt.config)  # before the weights load
    model = Transformer.from_pretrained(base, progress=progress)
    merge_lora(_add_adapter(model, *found, Path(adapter)))
    model.save_pretrained(out, layout or ckpt.layout, progress, extra_files=ckpt.companion_files())
