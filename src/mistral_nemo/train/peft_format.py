"""LoRA adapters on disk in PEFT's format, the one peft (on transformers) and vLLM load.

A folder holds `adapter_config.json` (PEFT's LoraConfig: r, lora_alpha, target_modules in
Hugging Face's module names, ...) and `adapter_model.safetensors`, its tensors named after
the Hugging Face model (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`)
and in its row order. Hugging Face checkpoints permute the rows of q and k per head
(`checkpoint.layouts`); as P(W + BA) = PW + (PB)A, B of q and k is permuted the same way
and A is left as it is.

Settings come and go as LoraConfig's fields (rank, alpha, dropout, target_modules in our
module names), tensors under our state-dict names (`layers.0.attention.wq.lora_a`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mistral_nemo.checkpoint import layouts
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's wrapper (PeftModel) and its tuner (LoraModel) each add a `base_model.` level,
# less the top one, which save_pretrained drops.
_PEFT_PREFIX = "base_model.model."
# Our tensor suffixes and PEFT's.
_MATRICES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
# PEFT settings that make an adapter compute something else than plain LoRA's
# W + BA · alpha / r on the target layers (variants, per-layer patterns, extra tensors).
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "bias",
    "fan_in_fan_out",
    "kasa_config",
    "layer_replication",
    "layers_to_transform",
    "lora_bias",
    "modules_to_save",
    "monteclora_config",
    "rank_pattern",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
)


def _module(tensor_name: str) -> str:
    """The module a weight belongs to, without its path: wq for layers.0.attention.wq.weight,
    q_proj for model.layers.0.self_attn.q_proj.weight."""
    return tensor_name.removesuffix(".weight").rpartition(".")[2]


# The blocks' modules under our names and Hugging Face's (wq: q_proj, w1: gate_proj, ...).
_HF_MODULES = {_module(t.mistral): _module(t.hf) for t in layouts.LAYER_TENSORS}
_OUR_MODULES = {hf: ours for ours, hf in _HF_MODULES.items()}


def write_adapter(
    path: Path,
    settings: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    base_model: str | None = None,
) -> None:
    """Write an adapter folder at `path` from LoraConfig's fields and the adapters' tensors
    by our names, atomically. An adapter folder already there is replaced; anything else
    is refused."""
    peft = {}
    for name, tensor in tensors.items():
        module, _, matrix = name.rpartition(".")
        hf_module = layouts.hf_name(f"{module}.weight").removesuffix(".weight")
        heads = layouts.rotary_heads(f"{module}.weight", config)
        if matrix == "lora_b" and heads is not None:
            tensor = layouts.mistral_to_hf_rows(tensor, heads)
        peft[f"{_PEFT_PREFIX}{hf_module}.{_MATRICES[matrix]}"] = tensor.contiguous().cpu()
    with _replacing_folder(path) as tmp:
        save_file(peft, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        text = json.dumps(_peft_config(settings, base_model), indent=2)
        (tmp / CONFIG_FILE).write_text(text + "\n")


def read_adapter(
    path: str | Path, config: ModelConfig
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """LoraConfig's fields and the adapters' tensors (our names and row order) from an
    adapter folder written by us or by peft."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; expected a PEFT adapter folder")
    try:
        settings = _lora_settings(json.loads(config_file.read_text()))
        peft = load_file(weights_file)
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: not a readable LoRA adapter ({e})") from None
    tensors = {}
    for key, tensor in peft.items():
        name = _our_name(key)
        if name is None:
            raise CheckpointError(f"{weights_file}: unexpected tensor {key!r}")
        module = name.rpartition(".")[0]
        heads = layouts.rotary_heads(f"{module}.weight", config)
        if name.endswith(".lora_b") and heads is not None:
            tensor = layouts.hf_to_mistral_rows(tensor, heads)
        tensors[name] = tensor
    return settings, tensors


def _our_name(key: str) -> str | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
    `layers.0.attention.wq.lora_a`; None for anything else."""
    for ours, theirs in _MATRICES.items():
        if key.startswith(_PEFT_PREFIX) and key.endswith(f".{theirs}"):
            hf_module = key.removeprefix(_PEFT_PREFIX).removesuffix(f".{theirs}")
            module = layouts.mistral_name(f"{hf_module}.weight")
            return None if module is None else f"{module.removesuffix('.weight')}.{ours}"
    return None


def _peft_config(settings: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": [_HF_MODULES[t] for t in settings["target_modules"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _lora_settings(raw: Any) -> dict[str, Any]:
    """LoraConfig's fields from PEFT's adapter config, refusing what plain LoRA is not."""
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise ValueError("peft_type is not LORA")
    used = [k for k in _UNSUPPORTED if raw.get(k) not in (None, False, "none", {}, [])]
    if used:
        raise ValueError(f"uses {', '.join(used)}, which plain LoRA here does not support")
    if missing := [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]:
        raise ValueError(f"lacks {', '.join(missing)}")
    targets = raw["target_modules"]
    if isinstance(targets, str) or any(t not in _OUR_MODULES for t in targets):
        raise ValueError(f"target_modules {targets!r}: expected a list of module names")
    return {
        "rank": int(raw["r"]),
        "alpha": float(raw["lora_alpha"]),
        "dropout": float(raw.get("lora_dropout", 0.0)),
        "target_modules": tuple(_OUR_MODULES[t] for t in targets),
    }


@contextmanager
def _replacing_folder(dst: Path) -> Iterator[Path]:
    """A temporary folder beside `dst` that takes its place when the block completes (and
    is removed if it fails). `dst` may be missing, empty or an adapter folder."""
    replaceable = not dst.exists() or (
        dst.is_dir() and ((dst / CONFIG_FILE).is_file() or not any(dst.iterdir()))
    )
    if not replaceable:
        raise CheckpointError(f"{dst}: exists and is not an adapter folder; choose a new path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
