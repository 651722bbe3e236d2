"""Paged KV cache: one pool of fixed-size blocks shared by all sequences.

Per layer, keys and values live in [num_blocks * block_size, kv_heads, head_dim] (vLLM's
[num_blocks, block_size, kv_heads, head_dim] layout, flattened), so a GPU paged-attention
kernel could read the blocks in place. Here attention gathers each sequence's blocks into
a padded batch and runs scaled_dot_product_attention with a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mistral_nemo.config import ModelConfig
from mistral_nemo.model import decode_attention, rope_frequencies


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        slots = num_blocks * block_size
        shape = (config.n_layers, slots, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.freqs = rope_frequencies(config, 0, max_len, device)

    @staticmethod
    def blocks_for_memory(
        config: ModelConfig, nbytes: int, block_size: int, dtype: torch.dtype
    ) -> int:
        return nbytes // (config.kv_bytes_per_token(dtype) * block_size)

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
        table = torch.zeros(len(tables), -(-longest // bs), dtype=torch.long)
        for b, t in enumerate(tables):
            table[b, : len(t)] = torch.tensor(t[: table.shape[1]], dtype=torch.long)
        pos = torch.arange(longest)
        slots = (table[:, pos // bs] * bs + pos % bs).to(device)  # [B, longest]
        self.read_slots = slots
        self.write_slots = slots.gather(1, self.positions).reshape(-1)
        self.mask: torch.Tensor | None = None
        if len(tables) > 1 or length > 1:
            # Key j is visible to the query at position p when j <= p (causal, and it masks
            # the padding past each sequence's end).
            self.mask = (
                torch.arange(longest, device=device)[None, None, :] <= self.positions[:, :, None]
            )[:, None]  # [B, 1, T, longest]

    def rope(self, start: int, length: int) -> torch.Tensor:
        return self.cache.freqs[self.positions]

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        b, kv_heads, t, head_dim = k.shape
        flat_k = self.cache.k[layer]
        flat_v = self.cache.v[layer]
        flat_k.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(-1, kv_heads, head_dim))
        flat_v.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(-1, kv_heads, head_dim))
        keys = flat_k[self.read_slots].transpose(1, 2)  # [B, kv_heads, longest, head_dim]
        values = flat_v[self.read_slots].transpose(1, 2)
        if t == 1:
            return decode_attention(q, keys, values, self.mask)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=True)
