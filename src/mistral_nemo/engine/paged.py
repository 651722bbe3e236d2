"""Paged KV cache: one pool of fixed-size blocks shared by all sequences.

Per layer, keys and values live in [num_blocks * block_size, kv_heads, head_dim] (vLLM's
[num_blocks, block_size, kv_heads, head_dim] layout, flattened), so a GPU paged-attention
kernel could read the blocks in place. Here attention gathers each sequence's blocks into
a padded batch and runs scaled_dot_product_attention with a mask. They are stored in the
model's dtype, or in FP8 (E4M3) with a scale per layer, which halves the cache of a bf16
model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mistral_nemo.config import ModelConfig
from mistral_nemo.kernels.decoder import KVLayout
from mistral_nemo.model import decode_attention, rope_frequencies
from mistral_nemo.quant.linear import FP8, FP8_MAX


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        slots = num_blocks * block_size
        shape = (config.n_layers, slots, config.n_kv_heads, config.head_dim)
        self.dtype = dtype  # of attention's inputs and outputs
        self.kv_dtype = kv_dtype or dtype  # of the stored keys and values
        self.k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.freqs = rope_frequencies(config, 0, max_len, device)
        # FP8: one scale per layer for keys and one for values, set by the first write.
        self.fp8 = self.kv_dtype == FP8
        self.k_scale = torch.zeros(config.n_layers, device=device)
        self.v_scale = torch.zeros(config.n_layers, device=device)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values [tokens, kv_heads, head_dim] into their slots."""
        for pool, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if self.fp8:
                if scales[layer] == 0:
                    # Twice the first batch's range: room for later tokens, which clamp
                    # beyond it; E4M3 keeps ~2 significant digits anywhere in its range.
                    scales[layer] = (x.abs().amax().float() * 2 / FP8_MAX).clamp(min=1e-6)
                x = (x.float() / scales[layer]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
                pool[layer].view(torch.uint8).index_copy_(0, slots, x.view(torch.uint8))
            else:
                pool[layer].index_copy_(0, slots, x)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the slots [B, n], as [B, kv_heads, n, head_dim]."""
        k, v = self.k[layer][slots], self.v[layer][slots]
        if self.fp8:
            k = k.to(self.dtype) * self.k_scale[layer].to(self.dtype)
            v = v.to(self.dtype) * self.v_scale[layer].to(self.dtype)
        return k.transpose(1, 2), v.transpose(1, 2)

    def step(
        self, tables: Sequence[Sequence[int]], starts: Sequence[int], length: int
    ) -> PagedStep:
        return PagedStep(self, tables, starts, length)


class PagedStep:
    """One forward pass over `length` new tokens of each of several sequences, whose earlier
    tokens (0..start) are already in the blocks listed in their block tables."""

    def __init__(
        self,
        cache: PagedKVCache,
        tables: Sequence[Sequence[int]],
        starts: Sequence[int],
        length: int,
    ) -> None:
        device = cache.k.device
        bs = cache.block_size
        self.cache = cache
        self.positions = (
            torch.tensor(starts, device=device)[:, None]
            + torch.arange(length, device=device)[None, :]
        )  # [B, T]
        ends = [s + length for s in starts]
        longest = max(ends)
        # Slot of every position 0..longest-1 of every sequence (padding repeats slot 0).
        n = -(-longest // bs)
        table = torch.tensor([[*t[:n], *[0] * (n - len(t[:n]))] for t in tables])
        slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :longest].to(device)
        self.read_slots = slots
        self.write_slots = slots.gather(1, self.positions).reshape(-1)
        # A lone sequence's decode step: its position and slots, for one_token_layout.
        self.lone = (starts[0], slots[0].contiguous()) if len(tables) == length == 1 else None
        self.mask: torch.Tensor | None = None
        if len(tables) > 1 or length > 1:
            # Key j is visible to the query at position p when j <= p (causal, and it masks
            # the padding past each sequence's end).
            self.mask = (
                torch.arange(longest, device=device)[None, None, :] <= self.positions[:, :, None]
            )[:, None]  # [B, 1, T, longest]

    def rope(self, start: int, length: int) -> torch.Tensor:
        return self.cache.freqs[self.positions]

    def one_token_layout(self, start: int) -> KVLayout | None:
        """A lone sequence's decode step reads its blocks in place (fp32 caches)."""
        c = self.cache
        if self.lone is None or c.kv_dtype != torch.float32 or c.k.device.type != "cpu":
            return None
        pos, slots = self.lone
        kv, hd = c.k.shape[2:]
        return KVLayout(c.k, c.v, kv * hd, hd, slots, c.freqs, pos)

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        b, kv_heads, t, head_dim = k.shape
        self.cache.store(
            layer,
            self.write_slots,
            k.transpose(1, 2).reshape(-1, kv_heads, head_dim),
            v.transpose(1, 2).reshape(-1, kv_heads, head_dim),
        )
        keys, values = self.cache.read(layer, self.read_slots)  # [B, kv_heads, longest, hd]
        if t == 1:
            return decode_attention(q, keys, values, self.mask)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=True)
