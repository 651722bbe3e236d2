"""The Mistral NeMo transformer: pre-norm decoder blocks with GQA attention, RoPE and SwiGLU.

Parameter names and the rotary layout (interleaved pairs) follow Mistral's own checkpoint
format, so a `consolidated.safetensors` state dict loads as is; the Hugging Face layout is
mapped onto it in `mistral_nemo.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo import kernels
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.kernels.decoder import Decoder, KVLayout, LayerSpec, LinearSpec


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

    def decode_layouts(self, start: int) -> list[KVLayout] | None:
        b, kv, max_len, hd = self.k.shape[1:]
        usable = self.k.dtype == torch.float32 and self.k.device.type == "cpu"
        if not 0 <= start < max_len or not usable:
            return None  # (the C step writes at `start` unchecked)
        return [
            KVLayout(self.k[:, i], self.v[:, i], hd, max_len * hd, self.freqs, start)
            for i in range(b)
        ]


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

    def decode_layouts(self, start: int) -> list[KVLayout] | None:
        """Optionally, for a decode step (one new token per sequence), where each sequence's
        keys and values are, for the C decode step (`kernels.decoder`); None to take the
        torch path."""
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


class Linear(nn.Linear):
    """A bias-free linear layer whose batch-1 CPU products use the GEMV kernel."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)

    def kernel_spec(self) -> LinearSpec:
        return LinearSpec(self.weight)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.wq = Linear(config.dim, config.n_heads * config.head_dim)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim)
        self.wqkv: nn.Module | None = None  # see Transformer.fuse_projections
        self.qkv_sizes = [config.n_heads * config.head_dim] + [
            config.n_kv_heads * config.head_dim
        ] * 2

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        start: int,
        cache: AttentionCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(b, t, self.n_heads, self.head_dim), freqs)
        k = apply_rope(k.view(b, t, self.n_kv_heads, self.head_dim), freqs)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
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
        self.w1 = Linear(config.dim, config.hidden_dim)
        self.w2 = Linear(config.hidden_dim, config.dim)
        self.w3 = Linear(config.dim, config.hidden_dim)
        self.w13: nn.Module | None = None  # see Transformer.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (bf16 sums of squares lose too much), scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


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


# Largest q/k/v stack (in weight elements) that fuse_projections fuses.
FUSE_MAX_ELEMENTS = 1 << 24


class _BuiltDecoder:
    """A model's C decode step and the entries of module, parameter and buffer dicts it was
    built from: valid while every one of them is still in place. Copies and pickles of a
    model start without one."""

    def __init__(self) -> None:
        self.decoder: Decoder | None = None
        self.pins: list[tuple[dict, str, object]] | None = None

    def pin(self, module: nn.Module, name: str) -> object:
        """module.<name> (a submodule, parameter or buffer, or None), remembered."""
        held = (module._modules, module._parameters, module._buffers)
        owner = next((d for d in held if name in d), module._modules)
        value = owner.get(name)
        assert self.pins is not None
        self.pins.append((owner, name, value))
        return value

    def valid(self) -> bool:
        return self.pins is not None and all(d.get(n) is v for d, n, v in self.pins)

    def __reduce__(self) -> tuple[type, tuple]:
        return (_BuiltDecoder, ())


def _layer_spec(block: Block, pin: Callable[[nn.Module, str], object]) -> LayerSpec | None:
    """What the C decode step needs of `block`, every module and tensor read through `pin`;
    None if a linear layer has no kernel form."""
    attn = cast(nn.Module, pin(block, "attention"))
    ffn = cast(nn.Module, pin(block, "feed_forward"))
    qkv = ["wqkv"] if pin(attn, "wqkv") is not None else ["wq", "wk", "wv"]
    gate_up = ["w13"] if pin(ffn, "w13") is not None else ["w1", "w3"]
    linears = {}
    for owner, names in ((attn, [*qkv, "wo"]), (ffn, [*gate_up, "w2"])):
        for name in names:
            module = cast(nn.Module, pin(owner, name))
            for tensor in (*module._parameters, *module._buffers):
                pin(module, tensor)
            kernel_spec = getattr(module, "kernel_spec", None)
            if kernel_spec is None:
                return None
            linears[name] = kernel_spec()
    attention_norm, ffn_norm = (
        cast(torch.Tensor, pin(cast(nn.Module, pin(block, n)), "weight"))
        for n in ("attention_norm", "ffn_norm")
    )
    return LayerSpec(
        attention_norm,
        ffn_norm,
        [linears[n] for n in qkv],
        linears["wo"],
        [linears[n] for n in gate_up],
        linears["w2"],
    )


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._built = _BuiltDecoder()

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
        if tokens.shape[1] == 1 and cache is not None and not torch.is_grad_enabled():
            layouts = cache.decode_layouts(start)
            decoder = self.kernel_decoder() if layouts else None
            if decoder is not None and layouts:
                return decoder(x, layouts).view(len(layouts), 1, -1).type_as(x)
        if cache is not None:
            freqs = cache.rope(start, tokens.shape[1])
        else:
            freqs = rope_frequencies(self.config, start, tokens.shape[1], x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, start, cache, i)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    def kernels_take(self, rows: int) -> bool:
        """Whether the CPU kernels do the products of a decode step of `rows` sequences (so
        torch should keep to one thread, see kernels.one_token_steps): one sequence of a
        model wide enough for them; several when the C decode step takes the model (fp32
        or quantized weights; bf16 products of several rows are torch's) and the kernels
        the LM head's product of that many rows."""
        if rows == 0 or self.device.type != "cpu":
            return False
        if rows == 1:
            return self.config.dim >= kernels.MIN_COLUMNS
        decoder = self.kernel_decoder()
        head = self.output
        if not isinstance(head, Linear):  # quantized
            head_rows = kernels.MAX_BATCH_QUANTIZED
        elif head.weight.dtype == torch.float32:
            head_rows = kernels.fp32_rows(self.config.dim)
        else:
            head_rows = 1
        return decoder is not None and rows <= head_rows

    def kernel_decoder(self) -> Decoder | None:
        """All layers of a decode step (a new token of each of up to `max_batch`
        sequences) as one C call (`kernels.decoder`), built on first use and again when a
        layer or weight has been replaced; None where the kernels do not cover this model
        (not fp32, a layer type they do not know)."""
        built = self._built
        if not built.valid():
            built.pins = []
            built.decoder = None
            layers = cast(nn.ModuleList, built.pin(self, "layers"))
            specs = [_layer_spec(cast(Block, built.pin(layers, str(i))), built.pin)
                     for i in range(len(layers))]  # fmt: skip
            norm = cast(torch.Tensor, built.pin(cast(nn.Module, built.pin(self, "norm")), "weight"))
            complete = [spec for spec in specs if spec is not None]
            shape = (self.config.n_heads, self.config.n_kv_heads, self.config.head_dim)
            if specs and len(complete) == len(specs) and Decoder.supports(complete, norm, *shape):
                built.decoder = Decoder(complete, norm, self.config.norm_eps, *shape)
        return built.decoder

    def _apply(self, fn, recurse=True):
        # .to(), .float() and the like may move weights without replacing their tensors.
        self._built.pins = None
        return super()._apply(fn, recurse)

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up of quantized layers into one product each (for inference:
        fewer, larger products; the separate layers keep views, so memory is unchanged).

        Only for narrow models: a call saved is ~15 us, which matters next to a 0.3 MB
        product (SmolLM2) and not next to a 16 MB one (NeMo), where the re-allocation leaves
        the heap fragmented instead (+1 GB peak RSS loading NeMo 12B)."""
        from mistral_nemo.quant import fuse_rows

        c = self.config
        if (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.dim > FUSE_MAX_ELEMENTS:
            return
        for block in self.layers:
            attn, ffn = cast(Block, block).attention, cast(Block, block).feed_forward
            attn.wqkv = fuse_rows([attn.wq, attn.wk, attn.wv])
            ffn.w13 = fuse_rows([ffn.w1, ffn.w3])

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
        from mistral_nemo.checkpoint import load_model

        return load_model(
            path,
            dtype=dtype,
            device=device,
            progress=progress,
            quantize=quantize,
            group_size=group_size,
        )

    def save_pretrained(
        self, path: str | Path, layout: str = "mistral", progress: bool = False
    ) -> None:
        """Write a checkpoint folder in `layout` ("mistral" or "hf"), atomically."""
        from mistral_nemo.checkpoint import save_model

        save_model(self, path, layout=layout, progress=progress)
