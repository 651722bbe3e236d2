"""Paged KV cache: one pool of fixed-size blocks shared by all sequences.

Per layer, keys and values live in [num_blocks * block_size, kv_heads, head_dim] (vLLM's
[num_blocks, block_size, kv_heads, head_dim] layout, flattened), so a GPU paged-attention
kernel could read the blocks in place, as the CPU's C decode step does (`decode_step.py`
reads a step's block tables). Otherwise attention gathers each sequence's blocks into a
padded batch and runs scaled_dot_product_attention with a mask. Keys and values are stored
in the model's dtype, or in FP8 (E4M3) with a scale per layer, which halves the cache of a
bf16 model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
import torch.nn.functional as F

from mistral_nemo.config import ModelConfig
from mistral_nemo.model import causal_attention, decode_attention, rope_frequencies
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
        self,
        tables: Sequence[Sequence[int]],
        starts: Sequence[int],
        lengths: int | Sequence[int],
    ) -> PagedStep:
        return PagedStep(self, tables, starts, lengths)


class PagedStep:
    """One forward pass over new tokens of several sequences (`lengths` of each, or one
    length for all), whose earlier tokens (0..start) are already in the blocks listed in
    their block tables. Sequences of different lengths are padded to the longest: a padding
    position repeats its sequence's last position and is never written to the cache."""

    def __init__(
        self,
        cache: PagedKVCache,
        tables: Sequence[Sequence[int]],
        starts: Sequence[int],
        lengths: int | Sequence[int],
    ) -> None:
        self.cache, self.tables, self.starts = cache, tables, starts
        self.lengths = [lengths] * len(tables) if isinstance(lengths, int) else list(lengths)
        self.length = max(self.lengths)  # of the padded batch

    @cached_property
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For torch's path: positions [B, T], the slots of positions 0..longest-1 [B,
        longest] (padding repeats slot 0), the slots to write (of the real positions, in
        order), and the mask of several sequences (None for one: its keys are all it sees,
        causally)."""
        device, bs = self.cache.k.device, self.cache.block_size
        steps = torch.arange(self.length)[None, :]
        lengths = torch.tensor(self.lengths)[:, None]
        positions = (torch.tensor(self.starts)[:, None] + steps.minimum(lengths - 1)).to(device)
        longest = max(s + n for s, n in zip(self.starts, self.lengths, strict=True))
        n = -(-longest // bs)
        table = torch.tensor([[*t[:n], *[0] * (n - len(t[:n]))] for t in self.tables])
        slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :longest].to(device)
        write = slots.gather(1, positions).reshape(-1)
        if self.ragged is not None:
            write = write[self.ragged]
        mask = None
        if len(self.tables) > 1:  # (one sequence's keys are exactly those it sees)
            # Key j is visible to the query at position p when j <= p (causal, and it masks
            # the padding past each sequence's end).
            mask = (torch.arange(longest, device=device)[None, None, :] <= positions[:, :, None])[
                :, None
            ]  # [B, 1, T, longest]
        return positions, slots, write, mask

    @cached_property
    def ragged(self) -> torch.Tensor | None:
        """Which of the padded batch's [B * T] rows are real tokens; None when all are."""
        if min(self.lengths) == self.length:
            return None
        steps = torch.arange(self.length)[None, :]
        real = (steps < torch.tensor(self.lengths)[:, None]).reshape(-1)
        return real.nonzero().squeeze(1).to(self.cache.k.device)

    def rope(self, start: int, length: int) -> torch.Tensor:
        return self.cache.freqs[self._batch[0]]

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        b, kv_heads, t, head_dim = k.shape
        _, read_slots, write_slots, mask = self._batch
        k_rows = k.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        v_rows = v.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        if self.ragged is not None:
            k_rows, v_rows = k_rows[self.ragged], v_rows[self.ragged]
        self.cache.store(layer, write_slots, k_rows, v_rows)
        keys, values = self.cache.read(layer, read_slots)  # [B, kv_heads, longest, hd]
        if t == 1:
            return decode_attention(q, keys, values, mask)
        if mask is None:
            return causal_attention(q, keys, values, self.starts[0])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
