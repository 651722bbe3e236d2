"""Mistral NeMo 12B in plain PyTorch."""

from mistral_nemo.config import ModelConfig
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.errors import (
    CheckpointError,
    ConfigError,
    InvalidRequestError,
    MistralNemoError,
)
from mistral_nemo.model import Transformer
from mistral_nemo.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "CheckpointError",
    "ConfigError",
    "InvalidRequestError",
    "MistralNemoError",
    "ModelConfig",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
]
