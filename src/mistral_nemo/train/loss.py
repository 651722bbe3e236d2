"""Cross-entropy through the LM head, a chunk of tokens at a time, without the full logits.

The logits of a training batch are its largest tensor: 2 x 4096 tokens x 131,072 entries
are 4 GiB in fp32, and the plain `cross_entropy(head(h).float(), labels)` holds them up to three
times over (the head's output, its fp32 copy, the log-softmax kept for backward) and writes
the same again in backward. Here the forward pass runs the head and the loss on a chunk of
rows, takes that chunk's gradients (towards the hidden states and the head's trainable
parameters) at once, and lets the chunk's logits go; backward only scales the stored
gradients. The result and its gradients are those of the plain loss, up to the order of
the fp32 sums.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo.train.packing import IGNORE

# Rows per chunk. A chunk's transient tensors take ~14 bytes per logit (bf16 and fp32 logits,
# their gradients): a budget of 32M logits (~450 MB) keeps that small next to a training
# step's activations, while fewer, larger chunks run faster (each chunk is one more pass
# over the head's weight). A trainable head adds the cost of accumulating its gradient,
# as large as the weight, once per chunk: with at least as many rows as the model's width
# a chunk's logits are at least the weight's size, so that never dominates. That raise is
# capped at 4x the budget (~1.8 GB): NeMo's 5120-wide head would otherwise take a whole
# 4k-token micro-batch at once (7.5 GB), where 1024 rows already make the accumulation a
# fifth of the chunk's work.
CHUNK_LOGITS = 1 << 25
BYTES_PER_LOGIT = 14


def head_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """The summed cross-entropy of `head(hidden)` ([..., vocab_size] logits, in fp32)
    against `labels` (positions labelled IGNORE left out), differentiable towards `hidden`
    and the head's trainable parameters. Runs under the caller's autocast."""
    params = [p for p in head.parameters() if p.requires_grad]
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    rows = chunk_rows(vocab_size, hidden.shape[-1], head_trains=bool(params))
    return _ChunkedHeadLoss.apply(head, rows, hidden, labels, *params)


def chunk_rows(vocab_size: int, dim: int, head_trains: bool) -> int:
    """Rows of hidden states per chunk; each takes ~BYTES_PER_LOGIT x vocab_size in flight."""
    rows = max(1, CHUNK_LOGITS // vocab_size)
    return max(rows, min(dim, 4 * rows)) if head_trains else rows


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        head: nn.Module,
        rows: int,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *params: nn.Parameter,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        wants_hidden = hidden.requires_grad
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params = [torch.zeros_like(p) for p in params]
        for start in range(0, hidden.shape[0], rows):
            chunk_labels = labels[start : start + rows]
            if not (chunk_labels != IGNORE).any():
                continue  # nothing trained here: no loss and no gradient
            with torch.enable_grad():
                chunk = hidden[start : start + rows].detach().requires_grad_(wants_hidden)
                logits = head(chunk).float()
                loss = F.cross_entropy(logits, chunk_labels, ignore_index=IGNORE, reduction="sum")
                inputs = ([chunk] if wants_hidden else []) + list(params)
                grads = torch.autograd.grad(loss, inputs) if inputs else ()
            total += loss.detach()
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grads[0]
                grads = grads[1:]
            for acc, grad in zip(grad_params, grads, strict=True):
                acc += grad
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grad_params)
        ctx.has_hidden_grad = wants_hidden
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_output if ctx.has_hidden_grad else None
        grad_params = [g * grad_output for g in saved]
        return (None, None, grad_hidden, None, *grad_params)
