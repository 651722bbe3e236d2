"""Mistral NeMo 12B in plain PyTorch."""

from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import (
    CheckpointError,
    ConfigError,
    InvalidRequestError,
    MistralNemoError,
)
from mistral_nemo.model import Transformer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InvalidRequestError",
    "MistralNemoError",
    "ModelConfig",
    "Transformer",
]
