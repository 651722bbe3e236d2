"""Weight quantization: FP8 (E4M3, per tensor or per channel), int8 per channel, int4 per
group. `quantize_linear` turns one bf16/fp32 weight into a quantized linear layer; the
checkpoint loader calls it tensor by tensor (`from_pretrained(..., quantize=...)`), so the
full-precision model is never in memory at once."""

from __future__ import annotations

import torch
from torch import nn

from mistral_nemo.errors import ConfigError
from mistral_nemo.quant.linear import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

SCHEMES = ("fp8", "fp8-channel", "int8", "int4")
GROUP_SIZES = (32, 64, 128)


def check_scheme(scheme: str, group_size: int = 128) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}"
        )
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


def quantize_linear(weight: torch.Tensor, scheme: str, group_size: int = 128) -> nn.Module:
    check_scheme(scheme, group_size)
    if scheme.startswith("fp8"):
        return Fp8Linear(*quantize_fp8(weight, per_channel=scheme == "fp8-channel"))
    if scheme == "int8":
        return Int8Linear(*quantize_int8(weight))
    q, scales_zeros = quantize_int4(weight, group_size)
    return Int4Linear(pack_int4(q), scales_zeros, group_size)


def is_linear_weight(name: str) -> bool:
    """Weights of the layers quantization applies to: attention, feed-forward, LM head."""
    return ".attention.w" in name or ".feed_forward.w" in name or name == "output.weight"


__all__ = [
    "GROUP_SIZES",
    "SCHEMES",
    "Fp8Linear",
    "Int4Linear",
    "Int8Linear",
    "check_scheme",
    "is_linear_weight",
    "quantize_linear",
]
