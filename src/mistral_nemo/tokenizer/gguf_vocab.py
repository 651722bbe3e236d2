"""Tokenizers in GGUF metadata (`tokenizer.ggml.*`), read and written the way llama.cpp's
converter writes them.

A GGUF with pre-tokenizer `tekken` is NeMo's: its tokens are Tekken's control tokens, then
the BPE ranks in order, so it becomes our Tekken tokenizer again, with the NeMo instruct
format. Other byte-level BPE vocabularies become a `BPETokenizer` with the file's chat
template.
"""

from __future__ import annotations

from typing import Any

from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer.base import BaseTokenizer
from mistral_nemo.tokenizer.bpe import (
    CONTROL,
    NORMAL,
    BPETokenizer,
    bytes_to_unicode,
    unicode_to_bytes,
)
from mistral_nemo.tokenizer.tekken import Tokenizer

# Tekken's pre-tokenizer pattern (tekken_240718.json), which the GGUF only names.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_from_gguf(get: Any, where: str) -> BaseTokenizer:
    """The tokenizer in a GGUF file's metadata; `get(key, default)` reads a key."""
    model = get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{where}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens") or []
    types: list[int] = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    pre = get("tokenizer.ggml.pre", "gpt-2")
    if not tokens or len(types) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer tokens or token types are missing")
    if pre == "tekken":
        return _tekken(tokens, types, where)
    return BPETokenizer(
        tokens,
        types,
        get("tokenizer.ggml.merges") or [],
        pre,
        bos_id=int(get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(get("tokenizer.ggml.eos_token_id", 2)),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
        chat_template=get("tokenizer.chat_template"),
    )


def _tekken(tokens: list[str], types: list[int], where: str) -> Tokenizer:
    num_special = next((i for i, t in enumerate(types) if t != CONTROL), len(types))
    ranks = {unicode_to_bytes(t): r for r, t in enumerate(tokens[num_special:])}
    if len(ranks) != len(tokens) - num_special:
        raise CheckpointError(f"{where}: Tekken vocabulary has repeated tokens")
    return Tokenizer(ranks, TEKKEN_PATTERN, tokens[:num_special])


def tekken_merges(tok: Tokenizer) -> list[str]:
    """Pair merges that make llama.cpp's rank-of-pair BPE reproduce Tekken's rank-of-token
    BPE: every split of each multi-byte token into two tokens, by the token's rank, then by
    the ranks of the two halves."""
    ranks = {tok.token_bytes(i): i for i in range(tok.num_special, tok.n_words)}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        splits = [
            (ranks[token[:j]], ranks[token[j:]], token[:j], token[j:])
            for j in range(1, len(token))
            if token[:j] in ranks and token[j:] in ranks
        ]
        merges += [(rank, lr, rr, left, right) for lr, rr, left, right in splits]
    merges.sort()
    return [f"{bytes_to_unicode(a)} {bytes_to_unicode(b)}" for *_, a, b in merges]


def add_tekken_metadata(writer: Any, tok: Tokenizer) -> None:
    """Write a Tekken tokenizer as llama.cpp's converter writes NeMo's."""
    tokens = list(tok.control_tokens) + [
        bytes_to_unicode(tok.token_bytes(i)) for i in range(tok.num_special, tok.n_words)
    ]
    types = [CONTROL] * tok.num_special + [NORMAL] * (tok.n_words - tok.num_special)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tekken_merges(tok))
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    writer.add_pad_token_id(tok.pad_id if tok.pad_id >= 0 else tok.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
