"""Model shape: presets and the two on-disk config formats (HF config.json, Mistral params.json)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mistral_nemo.errors import ConfigError

# NeMo was trained for 128k tokens; the released config.json claims 1,024,000 positions.
# The usable context is capped here so that no allocation is ever sized by that number.
NEMO_CONTEXT = 131_072


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = NEMO_CONTEXT
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "hidden_dim",
            "vocab_size",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"invalid model config: {name} must be a positive integer, got {value!r}"
                )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"invalid model config: n_heads ({self.n_heads}) must be divisible "
                f"by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"invalid model config: head_dim ({self.head_dim}) must be even "
                "for rotary embeddings"
            )
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError("invalid model config: rope_theta and norm_eps must be positive")

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(
                f"unknown preset {name!r}; choose from {', '.join(PRESETS)}"
            ) from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # -- sizes -----------------------------------------------------------------------------

    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim  # two RMSNorm weights
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embeddings + self.dim

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV cache bytes one token occupies across all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize

    # -- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10_000.0))
        heads = _required(cfg, "num_attention_heads", "config.json")
        dim = _required(cfg, "hidden_size", "config.json")
        return cls(
            dim=dim,
            n_layers=_required(cfg, "num_hidden_layers", "config.json"),
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or dim // heads,
            hidden_dim=_required(cfg, "intermediate_size", "config.json"),
            vocab_size=_required(cfg, "vocab_size", "config.json"),
            rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_seq_len=min(int(cfg.get("max_position_embeddings", NEMO_CONTEXT)), NEMO_CONTEXT),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=_first_id(cfg.get("bos_token_id"), 1),
            eos_id=_first_id(cfg.get("eos_token_id"), 2),
        )

    def to_hf(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "sliding_window": None,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    # -- Mistral params.json ---------------------------------------------------------------

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ModelConfig:
        heads = _required(params, "n_heads", "params.json")
        dim = _required(params, "dim", "params.json")
        return cls(
            dim=dim,
            n_layers=_required(params, "n_layers", "params.json"),
            n_heads=heads,
            n_kv_heads=params.get("n_kv_heads") or heads,
            head_dim=params.get("head_dim") or dim // heads,
            hidden_dim=_required(params, "hidden_dim", "params.json"),
            vocab_size=_required(params, "vocab_size", "params.json"),
            rope_theta=float(params.get("rope_theta", 10_000.0)),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            max_seq_len=min(int(params.get("max_seq_len", NEMO_CONTEXT)), NEMO_CONTEXT),
            tie_embeddings=bool(params.get("tied_embeddings", False)),
        )

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.tie_embeddings:
            params["tied_embeddings"] = True
        return params

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read the config of a checkpoint folder in either layout."""
        path = Path(path)
        for name, reader in (("params.json", cls.from_params), ("config.json", cls.from_hf)):
            file = path / name
            if file.is_file():
                try:
                    data = json.loads(file.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ConfigError(f"{file}: not valid JSON ({e})") from None
                if not isinstance(data, dict):
                    raise ConfigError(f"{file}: expected a JSON object")
                try:
                    return reader(data)
                except ConfigError as e:
                    raise ConfigError(f"{file}: {e}") from None
        raise ConfigError(
            f"{path}: no params.json (Mistral layout) or config.json (Hugging Face layout) found"
        )


def _required(cfg: dict[str, Any], key: str, file: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{file} lacks the field {key!r}")
    return cfg[key]


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


PRESETS: dict[str, ModelConfig] = {
    # Mistral-Nemo-Base/Instruct-2407.
    "nemo-12b": ModelConfig(
        dim=5120,
        n_layers=40,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
        vocab_size=131072,
    ),
    # Mistral-NeMo-Minitron-8B: NeMo pruned in width (hidden and FFN), 8k context.
    "minitron-8b": ModelConfig(
        dim=4096,
        n_layers=40,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=11520,
        vocab_size=131072,
        max_seq_len=8192,
    ),
    # Test-sized, with the real vocabulary (so the real tokenizer works) and, like NeMo,
    # head_dim != dim / n_heads.
    "tiny": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=192, vocab_size=131072
    ),
}
