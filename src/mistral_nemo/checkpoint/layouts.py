"""Tensor names and shapes of the Mistral and Hugging Face layouts, and the mapping between them.

Mistral's layout (ours, in memory) rotates interleaved pairs of head dims; Hugging Face's
rotates the two halves of each head. Converting permutes the rows of wq and wk per head.
"""

from __future__ import annotations

import re

import torch

from mistral_nemo.config import ModelConfig

# Mistral name suffix within a layer -> Hugging Face suffix.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_NAMES = {hf: mistral for mistral, hf in _LAYER_NAMES.items()}
_HF_GLOBAL_NAMES = {hf: mistral for mistral, hf in _GLOBAL_NAMES.items()}
_LAYER = re.compile(r"(model\.)?layers\.(\d+)\.(.+)")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint of `config`, by Mistral name, in file order."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
    per_layer = {
        "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
        "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
        "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
        "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
        "attention_norm.weight": (c.dim,),
        "ffn_norm.weight": (c.dim,),
        "feed_forward.w1.weight": (c.hidden_dim, c.dim),
        "feed_forward.w2.weight": (c.dim, c.hidden_dim),
        "feed_forward.w3.weight": (c.hidden_dim, c.dim),
    }
    for i in range(c.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    return shapes


def hf_name(mistral_name: str) -> str:
    if mistral_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[mistral_name]
    m = _LAYER.fullmatch(mistral_name)
    if m is None or m.group(3) not in _LAYER_NAMES:
        raise KeyError(mistral_name)
    return f"model.layers.{m.group(2)}.{_LAYER_NAMES[m.group(3)]}"


def mistral_name(hf: str) -> str | None:
    """The Mistral name of a Hugging Face tensor name, or None if it is not one of ours."""
    if hf in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[hf]
    m = _LAYER.fullmatch(hf)
    if m is None or m.group(1) is None or m.group(3) not in _HF_LAYER_NAMES:
        return None
    return f"layers.{m.group(2)}.{_HF_LAYER_NAMES[m.group(3)]}"


def rotary_heads(mistral_name: str, config: ModelConfig) -> int | None:
    """Heads whose rows need the rotary permutation for this tensor, or None."""
    if mistral_name.endswith("attention.wq.weight"):
        return config.n_heads
    if mistral_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def mistral_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows (0,1),(2,3),... of interleaved pairs -> first halves then second halves."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_mistral_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
