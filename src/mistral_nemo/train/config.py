"""What a training run does: one flat dataclass, read from YAML and overridden by `key=value`
arguments (as torchtune's CLI does), so a run is reproducible from its saved `config.yaml`."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mistral_nemo.errors import ConfigError


@dataclass
class TrainConfig:
    # What to train: a checkpoint folder or GGUF file (`mistral-nemo init-random` makes a
    # fresh one for pre-training from scratch), and where the run writes.
    model: str = ""
    output_dir: str = ""
    # Data: text corpora (.txt, .jsonl with "text") or chat conversations (.jsonl, "chat").
    data: list[str] = field(default_factory=list)
    data_format: str = "text"  # "text" (pre-training) or "chat" (SFT)
    seq_len: int = 2048
    # Whether packed documents see each other; default: yes for corpora (as pre-training
    # usually packs), no for conversations (one must not attend to another).
    cross_document_attention: bool | None = None
    bad_lines: str = "skip"  # or "error"
    cache_dir: str | None = None  # tokenized corpora; default ~/.cache/mistral-nemo/tokens
    # Optimisation.
    steps: int = 1000
    batch_size: int = 1  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "bf16"  # bf16 autocast over fp32 master weights, or "fp32"
    activation_checkpointing: bool = False
    seed: int = 0
    # LoRA / QLoRA: rank 0 trains every weight.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    )
    quantize: str | None = None  # QLoRA's frozen base: fp8, fp8-channel, int8, int4
    group_size: int = 128
    # Quantization-aware training (full fine-tuning): the linear layers compute with their
    # weights rounded as `mistral-nemo quantize --scheme QAT` stores them (train/qat.py);
    # the result is saved in fp32 so that quantizing it reproduces the training numbers.
    qat: str | None = None  # fp8, fp8-channel, int8, int4 (with group_size)
    qat_activations: bool = False  # also round layer inputs to FP8 (as FP8 GPU matmuls do)
    # "simulate": the fake quantization above, any device. "torchao" (qat=fp8 per tensor or
    # fp8-channel per row): torchao's float8 training, real FP8 matmuls (weights, inputs
    # and gradients, dynamic scales) where the hardware has them (H100 and later).
    qat_backend: str = "simulate"
    # Scale-out under torchrun (parallel.py): the processes form a (data, tensor) mesh of
    # (world / tp) x tp. Data-parallel ranks shard the model with FSDP2, each taking its share
    # of the micro-batches (the global batch is batch_size x grad_accum x world / tp);
    # tensor-parallel ranks split every layer.
    tp: int = 1
    sequence_parallel: bool = False  # with tp > 1: norms and residuals split by sequence
    cpu_offload: bool = False  # FSDP2 keeps sharded parameters and optimizer in host memory
    # Bookkeeping.
    save_every: int = 0  # steps between resumable checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = False
    plot: bool = False
    layout: str = "hf"  # of the final checkpoint
    device: str = "cpu"

    def attends_across_documents(self) -> bool:
        if self.cross_document_attention is None:
            return self.data_format == "text"
        return self.cross_document_attention

    def check(self) -> None:
        for name in ("model", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"training needs `{name}` (set it in the YAML or {name}=...)")
        if not self.data:
            raise ConfigError("training needs `data`: one or more corpus or conversation files")
        choices = {
            "data_format": ("text", "chat"),
            "precision": ("bf16", "fp32"),
            "bad_lines": ("skip", "error"),
            "layout": ("hf", "mistral"),
            "qat_backend": ("simulate", "torchao"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "tp")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.quantize and not self.lora_rank:
            raise ConfigError("quantize= trains LoRA adapters on a quantized base: set lora_rank")
        if self.qat:
            from mistral_nemo.quant import check_scheme

            check_scheme(self.qat, self.group_size)
            if self.lora_rank:
                raise ConfigError("qat= trains every weight: unset lora_rank")
        if self.lora_rank and self.tp > 1:
            raise ConfigError("tensor parallelism splits full weights, not LoRA: use tp=1 (FSDP)")
        if self.qat and self.tp > 1:
            raise ConfigError("qat= rounds whole weights (one scale per tensor): use tp=1")
        if self.sequence_parallel and self.seq_len % self.tp:
            raise ConfigError(f"sequence_parallel splits seq_len={self.seq_len} over tp={self.tp}")
        if self.cpu_offload and not self.device.startswith("cuda"):
            raise ConfigError("cpu_offload keeps GPU training's shards in host memory: device=cuda")
        if self.qat_backend == "torchao" and self.qat not in ("fp8", "fp8-channel"):
            raise ConfigError("qat_backend=torchao trains in FP8: set qat=fp8 or fp8-channel")
        if self.qat_activations and not (self.qat or "").startswith("fp8"):
            raise ConfigError("qat_activations rounds inputs to FP8: set qat=fp8 or fp8-channel")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and `key=value` overrides (values in YAML
    syntax: `lr=1e-4`, `data=[a.txt,b.txt]`, `quantize=null`)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{item!r}: overrides are key=value")
        values[key.strip()] = yaml.safe_load(raw) if raw else ""
    return _build(values)


def _build(values: dict[str, Any]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    kwargs = {name: _coerce(name, hints[name], value) for name, value in values.items()}
    config = TrainConfig(**kwargs)
    config.check()
    return config


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """YAML already typed the value; accept what it gave where the field's type allows it
    (an int for a float, one string for a list)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} numbers")
        try:
            return tuple(float(v) for v in value)
        except ValueError:
            raise ConfigError(f"{name} must be a list of {len(args)} numbers") from None
    if hint is float and not isinstance(value, bool):
        # PyYAML reads `1e-4` (no dot) as a string: YAML 1.1 floats need one.
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and value is not None:
        return str(value)
    raise ConfigError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
