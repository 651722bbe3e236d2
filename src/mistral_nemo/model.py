"""The Mistral NeMo transformer: pre-norm decoder blocks with GQA attention, RoPE and SwiGLU.

Parameter names and the rotary layout (interleaved pairs) follow Mistral's own checkpoint
format, so a `consolidated.safetensors` state dict loads as is; the Hugging Face layout is
mapped onto it in `mistral_nemo.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import InvalidRequestError


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    Sized by the caller from the prompt and the tokens to generate, never from the model's
    maximum context (128k tokens of NeMo KV is 20 GiB in bf16).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.freqs = rope_frequencies(config, 0, max_len, torch.device(device))

    def rope(self, start: int, length: int) -> torch.Tensor:
        return self.freqs[start : start + length]

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], start)


class AttentionCache(Protocol):
    """Where attention keeps keys and values: the contiguous KVCache above, or the engine's
    paged cache. Queries are [batch, heads, seq, head_dim]; keys and values of the new
    tokens are [batch, kv_heads, seq, head_dim]."""

    def rope(self, start: int, length: int) -> torch.Tensor:
        """Rotations for the new tokens: [seq, head_dim / 2] or [batch, seq, head_dim / 2]."""
        ...

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store k and v, then attend from q to everything the sequence has so far."""
        ...


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one new token per sequence: q [batch, heads, 1, head_dim] against keys
    and values [batch, kv_heads, len, head_dim], `mask` [batch, 1, 1, len] marking the keys
    each may see. Two matmuls with the query heads grouped by KV head: on a CPU this is
    ~10x faster than scaled_dot_product_attention's kernel for a single query."""
    b, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.view(b, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, heads, 1, head_dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Queries at positions start.. attending to keys 0..start+seq, causally."""
    t = q.shape[2]
    if t == 1:
        return decode_attention(q, k, v)
    mask = None
    if t > 1 and start > 0:
        # A chunk after cached tokens: each query sees the cache and the chunk causally.
        q_pos = torch.arange(start, start + t, device=q.device)
        mask = q_pos[:, None] >= torch.arange(start + t, device=q.device)[None, :]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=t > 1 and start == 0, enable_gqa=True
    )


def rope_frequencies(
    config: ModelConfig, start: int, length: int, device: torch.device
) -> torch.Tensor:
    """Complex rotations e^(i·pos·θ_j) for positions start..start+length, shape [length, hd/2]."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, half, device=device, dtype=torch.float32) * 2 / config.head_dim
    )
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, seq, heads, head_dim] by `freqs` ([seq or batch, seq, head_dim / 2]),
    pairing dims (0,1), (2,3), ... in fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs.unsqueeze(-2)).flatten(-2).type_as(x)


def linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.wq = linear(config.dim, config.n_heads * config.head_dim)
        self.wk = linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wv = linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wo = linear(config.n_heads * config.head_dim, config.dim)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        start: int,
        cache: AttentionCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # Heads counted from the projections' widths: a tensor-parallel rank has its share.
        q = apply_rope(self.wq(x).view(b, t, -1, self.head_dim), freqs)
        k = apply_rope(self.wk(x).view(b, t, -1, self.head_dim), freqs)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            out = causal_attention(q, k, v, start)
        else:
            out = cache.attend(layer, start, q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = linear(config.dim, config.hidden_dim)
        self.w2 = linear(config.hidden_dim, config.dim)
        self.w3 = linear(config.dim, config.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (bf16 sums of squares lose too much), scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        out = normed * self.weight
        if torch.is_autocast_enabled(x.device.type):
            # The layers after a norm would each cast its output for their matmuls (and keep
            # each copy for backward): cast it once for all of them.
            out = out.to(torch.get_autocast_dtype(x.device.type))
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        start: int,
        cache: AttentionCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs, start, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = linear(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (weights may be quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_seq_len:
            raise InvalidRequestError(
                f"{max_len} tokens exceed the model's context of {self.config.max_seq_len}"
            )
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    def forward(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        cache: AttentionCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `tokens` [batch, seq] placed at positions start..start+seq.

        With a cache, keys and values of these positions are stored and earlier ones read.
        `last_only` computes the LM head for the final position alone (prefill).
        """
        return self.output(self.hidden(tokens, start, cache, last_only))

    def hidden(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        cache: AttentionCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """`forward` short of the LM head: the final norm's output [batch, seq, dim] (so that
        a serving step can put the rows of several passes through one LM head product)."""
        x = self.tok_embeddings(tokens)
        if cache is not None:
            freqs = cache.rope(start, tokens.shape[1])
        else:
            freqs = rope_frequencies(self.config, start, tokens.shape[1], x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, start, cache, i)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        quantize: str | None = None,
        group_size: int = 128,
    ) -> Transformer:
        """Load a checkpoint folder in the Mistral or Hugging Face layout (memory-mapped).

        `quantize` ("fp8", "fp8-channel", "int8", "int4") quantizes the linear layers as
        they are read, one tensor at a time.
        """
        # Imported here: the checkpoint formats sit around the model, which stays importable
        # (and wrappable) without them.
        from mistral_nemo.checkpoint import load_model

        return load_model(
            path,
            cls,
            dtype=dtype,
            device=device,
            progress=progress,
            quantize=quantize,
            group_size=group_size,
        )

    def save_pretrained(
        self,
        path: str | Path,
        layout: str = "mistral",
        progress: bool = False,
        dtype: torch.dtype | None = None,
        extra_files: dict[str, Path | bytes] | None = None,
    ) -> None:
        """Write a checkpoint folder in `layout` ("mistral" or "hf"), atomically, in `dtype`
        (default: the weights' own), `extra_files` (name: path or bytes) beside it."""
        from mistral_nemo.checkpoint import save_model

        save_model(
            self, path, layout=layout, progress=progress, extra_files=extra_files, dtype=dtype
        )
