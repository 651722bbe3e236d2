"""Quantization-aware training: each linear layer computes with its weight as the inference
quantizer will store it, so that training finds weights which survive the rounding.

`add_fake_quantization` swaps the linear layers of the blocks and the LM head for
`FakeQuantLinear`: an nn.Linear holding the same parameter (so names, optimizer groups,
FSDP and checkpoints are unchanged) whose forward multiplies by
`quant.quantized_weight(weight)`, i.e. through the quantized layer `mistral-nemo quantize`
writes and its own dequantization. A QAT model and its quantized checkpoint therefore give
the same logits. Gradients pass the rounding unchanged (the straight-through estimator).

A tied LM head stays in full precision: it is the embedding table, which the quantized
checkpoint keeps unquantized. With `activations` (FP8 only), each layer's input is also
rounded to E4M3 with one dynamic scale per tensor, as the FP8 matmul on GPUs
(`Fp8Linear._scaled_mm`) rounds it; the CPU kernels keep activations in full precision.

`use_float8_training` is the other way to train for FP8: torchao's float8 training, whose
matmuls run in FP8 (inputs, weights and output gradients cast with dynamic scales) where
the hardware has FP8 units. It is about speed on such GPUs; its rounding is torchao's
(scales as 448 / amax), close to but not bit-equal with the quantizer's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo.errors import ConfigError
from mistral_nemo.model import Transformer
from mistral_nemo.quant import check_scheme, layer_scheme, quantized_weight
from mistral_nemo.quant.grids import FP8, FP8_MAX


class _StraightThrough(torch.autograd.Function):
    """round(x) forward, identity backward."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, round_: Callable[[torch.Tensor], torch.Tensor]):
        return round_(x.detach()).to(x.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor):
        return grad, None


def fp8_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded to E4M3 with one scale mapping its largest value to the grid's end."""
    scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


class FakeQuantLinear(nn.Linear):
    def __init__(self, base: nn.Linear, scheme: str, group_size: int, activations: bool) -> None:
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.scheme, self.group_size, self.activations = scheme, group_size, activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _StraightThrough.apply(self.weight, self._round)
        if self.activations:
            x = _StraightThrough.apply(x, fp8_activations)
        return F.linear(x, weight)

    def _round(self, weight: torch.Tensor) -> torch.Tensor:
        return quantized_weight(weight, self.scheme, self.group_size)

    def extra_repr(self) -> str:
        act = ", activations fp8" if self.activations else ""
        return f"{super().extra_repr()}, qat={self.scheme}{act}"


def add_fake_quantization(
    model: Transformer, scheme: str, group_size: int = 128, activations: bool = False
) -> Transformer:
    """Fake-quantize every linear layer of `model` in place, as `mistral-nemo quantize
    --scheme scheme` would store it (the LM head in int8 under int4, as there). Returns
    `model`."""
    check_scheme(scheme, group_size)
    if activations and not scheme.startswith("fp8"):
        raise ConfigError("activation fake quantization is FP8's (qat=fp8 or fp8-channel)")
    for name, module in list(model.named_modules()):
        if name == "output" and model.config.tie_embeddings:
            continue
        if type(module) is not nn.Linear:
            continue
        parent, _, attr = name.rpartition(".")
        layer = FakeQuantLinear(module, layer_scheme(name, scheme), group_size, activations)
        setattr(model.get_submodule(parent), attr, layer)
    return model


def use_float8_training(model: Transformer, per_row: bool = False) -> Transformer:
    """torchao's float8 training on every linear layer of the blocks, in place: per-tensor
    scales, or per row (`per_row`, torchao's "rowwise" recipe). The LM head stays in full
    precision, as torchao advises. Returns `model`."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("qat_backend=torchao needs torchao: pip install torchao") from None
    recipe = Float8LinearConfig.from_recipe_name("rowwise" if per_row else "tensorwise")
    convert_to_float8_training(model, config=recipe, module_filter_fn=lambda _, n: n != "output")
    return model
