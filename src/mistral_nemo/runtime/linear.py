"""Bias-free linear layers whose products of a few rows on the CPU go through the GEMV
kernels (`kernels.linear`): one token's activations against a large bf16 or fp32 weight,
read at memory speed (torch's bf16 path reaches about half of it), or a few dozen rows
against an fp32 weight, read once for all of them (a serving step's LM head)."""

from __future__ import annotations

import torch
from torch import nn

from mistral_nemo import kernels


class KernelLinear(nn.Linear):
    """nn.Linear without bias, through `kernels.linear` (which falls back to F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


def use_kernel_linears(model: nn.Module) -> None:
    """Put every bias-free nn.Linear of `model` through the kernels, its weight shared (the
    model's tensors and results are unchanged; quantized layers have kernels of their own)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                fast = KernelLinear(
                    child.in_features, child.out_features, bias=False, device="meta"
                )
                fast.weight = child.weight
                setattr(parent, name, fast)
