"""Tekken and the NeMo instruct format; the BPE tokenizers of other GGUF models."""

from __future__ import annotations

from pathlib import Path

from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer.base import BaseTokenizer, SpecialTokenPolicy, StreamDecoder
from mistral_nemo.tokenizer.tekken import Tokenizer


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """The tokenizer of a checkpoint: a GGUF file's own; in a folder, `tekken.json` (Tekken
    and the NeMo instruct format), else `tokenizer.json` (as transformers saves it)."""
    from mistral_nemo.checkpoint.gguf_file import GGUFFile, is_gguf
    from mistral_nemo.tokenizer.hf_files import HFTokenizer

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_gguf(path):
        from mistral_nemo.tokenizer.gguf_vocab import tokenizer_from_gguf

        file = GGUFFile(path)
        return tokenizer_from_gguf(file.get, str(path))
    if (path / "tekken.json").is_file():
        return Tokenizer.from_pretrained(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_pretrained(path)
    raise CheckpointError(
        f"{path}: no tokenizer found (tekken.json or tokenizer.json); "
        "to run on token ids alone, load it with skip_tokenizer_init=True"
    )


__all__ = ["BaseTokenizer", "SpecialTokenPolicy", "StreamDecoder", "Tokenizer", "load_tokenizer"]
