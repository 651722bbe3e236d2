"""Tekken tokenizer and the NeMo instruct format."""

from mistral_nemo.tokenizer.tekken import SpecialTokenPolicy, StreamDecoder, Tokenizer

__all__ = ["SpecialTokenPolicy", "StreamDecoder", "Tokenizer"]
