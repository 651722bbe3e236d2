"""ModelRunner: a plain Transformer run for inference on this machine.

The model stays the reference; the runner puts the fast path beside it: the GEMV kernels
for its bias-free linear layers, the C decode step for decode steps it covers, the thread
policy for steps the kernels do, and one LM head product for the rows of a serving step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from mistral_nemo import kernels
from mistral_nemo.model import KVCache, Transformer
from mistral_nemo.runtime.decode_step import DecodeStep, kv_layouts
from mistral_nemo.runtime.linear import use_kernel_linears
from mistral_nemo.runtime.paged import PagedStep
from mistral_nemo.runtime.threads import before_large_ops, one_token_steps


class ModelRunner:
    def __init__(self, model: Transformer, kernels: bool = True) -> None:
        """`kernels=False` runs the model as it is (one split by tensor parallelism)."""
        self.model = model
        if kernels and model.device.type == "cpu":
            use_kernel_linears(model)
        self.decode_step = DecodeStep(model) if kernels else None

    def kernels_take(self, rows: int) -> bool:
        """Whether the CPU kernels do the products of a decode step of `rows` sequences (so
        torch should keep to one thread): one sequence of a model wide enough for them;
        several when the C decode step takes the model (fp32 or quantized weights; bf16
        products of several rows are torch's) and the kernels the LM head's product of that
        many rows."""
        model = self.model
        if rows == 0 or model.device.type != "cpu" or self.decode_step is None:
            return False
        if rows == 1:
            return model.config.dim >= kernels.MIN_COLUMNS
        head = model.output
        if not isinstance(head, torch.nn.Linear):  # quantized
            head_rows = kernels.MAX_BATCH_QUANTIZED
        elif head.weight.dtype == torch.float32:
            head_rows = kernels.fp32_rows(model.config.dim)
        else:
            head_rows = 1
        return rows <= head_rows and self.decode_step.decoder() is not None

    def decoding(self, rows: int, prefill: bool = False) -> AbstractContextManager[None]:
        """The thread policy for a step decoding `rows` sequences (and prefilling, if
        `prefill`): the kernels get the cores when they do the whole step. Sampling
        belongs inside."""
        if prefill or not self.kernels_take(rows):
            return nullcontext()
        return one_token_steps()

    def hidden(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        cache: KVCache | PagedStep | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """`Transformer.hidden`, through the C decode step for one new token per sequence
        where it covers the model and the cache."""
        step = self.decode_step
        if step and tokens.shape[1] == 1 and cache is not None and not torch.is_grad_enabled():
            layouts = kv_layouts(cache, start)
            if layouts:
                out = step(self.model.tok_embeddings(tokens), layouts)
                if out is not None:
                    return out
        return self.model.hidden(tokens, start, cache, last_only)

    def logits(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        cache: KVCache | PagedStep | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """`Transformer.forward`, as `hidden` runs it."""
        return self.model.output(self.hidden(tokens, start, cache, last_only))

    def step(
        self,
        decode: tuple[torch.Tensor, PagedStep] | None,
        prefills: Sequence[tuple[torch.Tensor, PagedStep, Sequence[int]]],
    ) -> torch.Tensor | None:
        """One serving step: a new token of each decoding sequence (tokens [n, 1] and their
        paged step), then batches of prompt chunks (tokens [B, T] padded to the longest, their
        ragged step, and how many of each chunk's last positions need logits: 1 where it ends
        its prompt, more to score the prompt). Logits [rows, vocab] in fp32 of the decoding
        sequences, then of each chunk's rows, in that order, from one LM head product (sixteen
        prompts ending together had cost 16); None if no row is wanted."""
        rows: list[torch.Tensor] = []
        if decode is not None:
            tokens, step = decode
            rows.append(self.hidden(tokens, cache=step)[:, -1])
            if prefills:
                before_large_ops()
        for tokens, cache, wanted in prefills:
            last_only = len(wanted) == 1 and wanted[0] == 1
            hidden = self.model.hidden(tokens, cache=cache, last_only=last_only)
            if last_only:
                rows.append(hidden[0])
                continue
            rows += [
                hidden[i, n - w : n]
                for i, (n, w) in enumerate(zip(cache.lengths, wanted, strict=True))
                if w
            ]
        if not rows:
            return None
        return self.model.output(rows[0] if len(rows) == 1 else torch.cat(rows)).float()
