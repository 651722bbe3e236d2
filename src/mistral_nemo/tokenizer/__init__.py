"""Tekken and the NeMo instruct format; the BPE tokenizers of other GGUF models."""

from __future__ import annotations

from pathlib import Path

from mistral_nemo.tokenizer.base import BaseTokenizer, SpecialTokenPolicy, StreamDecoder
from mistral_nemo.tokenizer.tekken import Tokenizer


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """The tokenizer of a checkpoint: tekken.json in a folder, or a GGUF file's own."""
    from mistral_nemo.checkpoint.gguf_file import GGUFFile, is_gguf

    if is_gguf(path):
        from mistral_nemo.tokenizer.gguf_vocab import tokenizer_from_gguf

        file = GGUFFile(path)
        return tokenizer_from_gguf(file.get, str(path))
    return Tokenizer.from_pretrained(path)


__all__ = ["BaseTokenizer", "SpecialTokenPolicy", "StreamDecoder", "Tokenizer", "load_tokenizer"]
