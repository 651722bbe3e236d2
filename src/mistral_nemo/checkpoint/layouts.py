"""The tensors of a checkpoint: one table of every parameter under its Mistral (ours, in
memory), Hugging Face and GGUF names, with its shape, from which all renaming is derived.

Mistral's layout rotates interleaved pairs of head dims; Hugging Face's rotates the two
halves of each head, so converting permutes the rows of wq and wk per head. llama.cpp's
converter permutes them back into interleaved pairs, so GGUF tensors only need renaming.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mistral_nemo.config import ModelConfig


@dataclass(frozen=True)
class TensorNames:
    """One parameter: its names in the three formats (within a layer, for a layer's), its
    shape under a config, and, for q and k, the head count whose rows RoPE rotates."""

    mistral: str
    hf: str
    gguf: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    rotary_heads: Callable[[ModelConfig], int] | None = None


_EMBEDDINGS = TensorNames(
    "tok_embeddings.weight",
    "model.embed_tokens.weight",
    "token_embd.weight",
    lambda c: (c.vocab_size, c.dim),
)
LAYER_TENSORS = (
    TensorNames(
        "attention.wq.weight",
        "self_attn.q_proj.weight",
        "attn_q.weight",
        lambda c: (c.n_heads * c.head_dim, c.dim),
        lambda c: c.n_heads,
    ),
    TensorNames(
        "attention.wk.weight",
        "self_attn.k_proj.weight",
        "attn_k.weight",
        lambda c: (c.n_kv_heads * c.head_dim, c.dim),
        lambda c: c.n_kv_heads,
    ),
    TensorNames(
        "attention.wv.weight",
        "self_attn.v_proj.weight",
        "attn_v.weight",
        lambda c: (c.n_kv_heads * c.head_dim, c.dim),
    ),
    TensorNames(
        "attention.wo.weight",
        "self_attn.o_proj.weight",
        "attn_output.weight",
        lambda c: (c.dim, c.n_heads * c.head_dim),
    ),
    TensorNames(
        "attention_norm.weight", "input_layernorm.weight", "attn_norm.weight", lambda c: (c.dim,)
    ),
    TensorNames(
        "ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", lambda c: (c.dim,)
    ),
    TensorNames(
        "feed_forward.w1.weight",
        "mlp.gate_proj.weight",
        "ffn_gate.weight",
        lambda c: (c.hidden_dim, c.dim),
    ),
    TensorNames(
        "feed_forward.w2.weight",
        "mlp.down_proj.weight",
        "ffn_down.weight",
        lambda c: (c.dim, c.hidden_dim),
    ),
    TensorNames(
        "feed_forward.w3.weight",
        "mlp.up_proj.weight",
        "ffn_up.weight",
        lambda c: (c.hidden_dim, c.dim),
    ),
)
_FINAL_NORM = TensorNames(
    "norm.weight", "model.norm.weight", "output_norm.weight", lambda c: (c.dim,)
)
_LM_HEAD = TensorNames(
    "output.weight", "lm_head.weight", "output.weight", lambda c: (c.vocab_size, c.dim)
)
MODEL_TENSORS = (_EMBEDDINGS, _FINAL_NORM, _LM_HEAD)

# How each format names layer i's tensors: a prefix before the within-layer name.
_LAYER_PREFIXES = {"mistral": "layers.{}.", "hf": "model.layers.{}.", "gguf": "blk.{}."}
_LAYER_PATTERNS = {
    fmt: re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + "(.+)")
    for fmt, prefix in _LAYER_PREFIXES.items()
}
_MODEL_BY_NAME = {fmt: {getattr(t, fmt): t for t in MODEL_TENSORS} for fmt in _LAYER_PREFIXES}
_LAYER_BY_NAME = {fmt: {getattr(t, fmt): t for t in LAYER_TENSORS} for fmt in _LAYER_PREFIXES}


def _lookup(name: str, fmt: str) -> tuple[TensorNames, str | None] | None:
    """The table row of `name` in format `fmt` and its layer index (None outside layers)."""
    if name in _MODEL_BY_NAME[fmt]:
        return _MODEL_BY_NAME[fmt][name], None
    m = _LAYER_PATTERNS[fmt].fullmatch(name)
    if m is None or m[2] not in _LAYER_BY_NAME[fmt]:
        return None
    return _LAYER_BY_NAME[fmt][m[2]], m[1]


def _rename(name: str, src: str, dst: str) -> str | None:
    found = _lookup(name, src)
    if found is None:
        return None
    row, layer = found
    prefix = "" if layer is None else _LAYER_PREFIXES[dst].format(layer)
    return prefix + getattr(row, dst)


def hf_name(mistral: str) -> str:
    return _rename_ours(mistral, "hf")


def gguf_name(mistral: str) -> str:
    return _rename_ours(mistral, "gguf")


def _rename_ours(mistral: str, dst: str) -> str:
    name = _rename(mistral, "mistral", dst)
    if name is None:
        raise KeyError(mistral)
    return name


def mistral_name(hf: str) -> str | None:
    """The Mistral name of a Hugging Face tensor name, or None if it is not one of ours."""
    return _rename(hf, "hf", "mistral")


def mistral_name_of_gguf(gguf: str) -> str | None:
    """The Mistral name of a GGUF tensor name, or None if it is not one of ours."""
    return _rename(gguf, "gguf", "mistral")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config`, by Mistral name, in file order."""
    c = config
    shapes = {_EMBEDDINGS.mistral: _EMBEDDINGS.shape(c)}
    for i in range(c.n_layers):
        prefix = _LAYER_PREFIXES["mistral"].format(i)
        shapes.update({prefix + t.mistral: t.shape(c) for t in LAYER_TENSORS})
    shapes[_FINAL_NORM.mistral] = _FINAL_NORM.shape(c)
    if not c.tie_embeddings:
        shapes[_LM_HEAD.mistral] = _LM_HEAD.shape(c)
    return shapes


def rotary_heads(mistral: str, config: ModelConfig) -> int | None:
    """Heads whose rows need the rotary permutation for this tensor, or None."""
    found = _lookup(mistral, "mistral")
    if found is None or found[0].rotary_heads is None:
        return None
    return found[0].rotary_heads(config)


def mistral_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows (0,1),(2,3),... of interleaved pairs -> first halves then second halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_mistral_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
