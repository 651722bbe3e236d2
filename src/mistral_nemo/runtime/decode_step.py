"""The C decode step (`kernels.decoder`) built from a model's weights, and where each
sequence's keys and values are for it.

The decoder holds pointers into the model's tensors, so it is valid only while they are
the model's: it is rebuilt after any module, parameter or buffer is assigned anywhere
(torch's global registration hooks count those) or a weight's storage moved (`.to()`,
`.float()`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from mistral_nemo.kernels.decoder import Decoder, KVLayout, LayerSpec, LinearSpec
from mistral_nemo.model import Block, KVCache, Transformer
from mistral_nemo.quant import fuse_rows
from mistral_nemo.runtime.paged import PagedStep

# Largest q/k/v stack (in weight elements) whose quantized layers are fused into one
# product: a call saved is ~15 us, which matters next to a 0.3 MB product (SmolLM2) and not
# next to a 16 MB one (NeMo), where the copy would fragment the heap (+1 GB peak RSS).
FUSE_MAX_ELEMENTS = 1 << 24

_assignments = itertools.count()
_last_assignment = 0


def _count_assignment(*_: object) -> None:
    global _last_assignment
    _last_assignment = next(_assignments)


for _register in (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
    register_module_buffer_registration_hook,
):
    _register(_count_assignment)


def _linear_spec(module: nn.Module) -> LinearSpec | None:
    """A linear layer as the kernels read it: a bias-free nn.Linear, or a quantized layer
    (which says so itself); None for anything else."""
    if isinstance(module, nn.Linear) and module.bias is None:
        return LinearSpec(module.weight)
    kernel_spec = getattr(module, "kernel_spec", None)
    return kernel_spec() if kernel_spec is not None else None


def _fused_spec(layers: list[nn.Module], fuse: bool) -> list[LinearSpec] | None:
    """The kernel form of layers that share their input: one stacked product where `fuse`
    and the layers allow it (quantized ones: `fuse_rows`), else one each."""
    fused = fuse_rows(layers) if fuse else None
    specs = [_linear_spec(x) for x in ([fused] if fused is not None else layers)]
    return None if any(s is None for s in specs) else specs  # type: ignore[return-value]


def _layer_spec(block: Block, fuse: bool) -> LayerSpec | None:
    attn, ffn = block.attention, block.feed_forward
    qkv = _fused_spec([attn.wq, attn.wk, attn.wv], fuse)
    gate_up = _fused_spec([ffn.w1, ffn.w3], fuse)
    wo, w2 = _linear_spec(attn.wo), _linear_spec(ffn.w2)
    if qkv is None or gate_up is None or wo is None or w2 is None:
        return None
    return LayerSpec(block.attention_norm.weight, block.ffn_norm.weight, qkv, wo, gate_up, w2)


class DecodeStep:
    """A model's C decode step, kept while the model's tensors are the ones it was built
    from; `decoder()` is None where the kernels do not cover the model (not fp32
    activations, a layer type they do not know, an unsupported shape)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self._built_at = -1  # _last_assignment when built
        self._storage: list[tuple[torch.Tensor, int]] = []  # model tensors and their data_ptr
        self._decoder: Decoder | None = None

    def decoder(self) -> Decoder | None:
        if self._built_at != _last_assignment or any(
            t.data_ptr() != ptr for t, ptr in self._storage
        ):
            self._build()
        return self._decoder

    def _build(self) -> None:
        model, c = self.model, self.model.config
        fuse = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.dim <= FUSE_MAX_ELEMENTS
        specs = [_layer_spec(cast(Block, block), fuse) for block in model.layers]
        complete = [spec for spec in specs if spec is not None]
        shape = (c.n_heads, c.n_kv_heads, c.head_dim)
        self._decoder = None
        norm = model.norm.weight
        if specs and len(complete) == len(specs) and Decoder.supports(complete, norm, *shape):
            self._decoder = Decoder(complete, norm, c.norm_eps, *shape)
        self._storage = [(t, t.data_ptr()) for t in (*model.parameters(), *model.buffers())]
        self._built_at = _last_assignment  # after fusing, which assigns buffers

    def __call__(self, x: torch.Tensor, layouts: Sequence[KVLayout]) -> torch.Tensor | None:
        """The final norm's output [batch, 1, dim] for one new token per sequence, or None
        where the kernels do not take this model."""
        decoder = self.decoder()
        if decoder is None:
            return None
        return decoder(x, layouts).view(len(layouts), 1, -1).type_as(x)


def kv_layouts(cache: KVCache | PagedStep, start: int) -> list[KVLayout] | None:
    """Where each sequence's keys and values are, for a decode step writing position `start`
    of a contiguous cache or each sequence's next position of a paged step; None where the
    C step cannot read them (not fp32 on the CPU, or not room for the new token: it writes
    unchecked)."""
    if isinstance(cache, KVCache):
        b, kv, max_len, hd = cache.k.shape[1:]
        if not 0 <= start < max_len or not _readable(cache.k):
            return None
        return [
            KVLayout(cache.k[:, i], cache.v[:, i], hd, max_len * hd, cache.freqs, start)
            for i in range(b)
        ]
    pool = cache.cache
    if cache.length != 1 or not _readable(pool.k):
        return None
    bs, (kv, hd) = pool.block_size, pool.k.shape[2:]
    used = [pos // bs + 1 for pos in cache.starts]  # blocks up to the new token's
    if any(len(t) < n for t, n in zip(cache.tables, used, strict=True)):
        return None
    blocks = torch.tensor([b for t, n in zip(cache.tables, used, strict=True) for b in t[:n]])
    return [
        KVLayout(pool.k, pool.v, kv * hd, hd, pool.freqs, pos, table, bs)
        for pos, table in zip(cache.starts, blocks.split(used), strict=True)
    ]


def _readable(kv: torch.Tensor) -> bool:
    return kv.dtype == torch.float32 and kv.device.type == "cpu"
