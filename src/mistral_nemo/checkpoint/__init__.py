"""Checkpoints: folders in the Mistral (params.json + consolidated.safetensors) and Hugging
Face (config.json + model[-K-of-N].safetensors) layouts, and llama.cpp's GGUF files: open,
validate, load, write, convert.

GGUF export (`gguf_export`) and random checkpoints (`random_init`) are imported from their
modules: they need the tokenizer package, which reads GGUF files through this one.
"""

from mistral_nemo.checkpoint.conversion import convert_checkpoint, quantize_checkpoint
from mistral_nemo.checkpoint.loading import load_model
from mistral_nemo.checkpoint.reading import RANDOM_MARKER, open_checkpoint
from mistral_nemo.checkpoint.writing import save_model, write_checkpoint

__all__ = [
    "RANDOM_MARKER",
    "convert_checkpoint",
    "load_model",
    "open_checkpoint",
    "quantize_checkpoint",
    "save_model",
    "write_checkpoint",
]
