"""Weight quantization: FP8 (E4M3, per tensor or per channel), int8 per channel, int4 per
group. `quantize_linear` turns one bf16/fp32 weight into a quantized linear layer; the
checkpoint loader calls it tensor by tensor (`from_pretrained(..., quantize=...)`), so the
full-precision model is never in memory at once."""

from __future__ import annotations

import torch
from torch import nn

from mistral_nemo.errors import ConfigError
from mistral_nemo.quant.linear import (
    GROUP_SIZES,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    int4_group_size,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

SCHEMES = ("fp8", "fp8-channel", "int8", "int4")


def check_scheme(scheme: str, group_size: int = 128) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}"
        )
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


def quantize_linear(weight: torch.Tensor, scheme: str, group_size: int = 128) -> nn.Module:
    """`weight` [out, in] as a quantized layer. int4 takes groups of `group_size` inputs, or
    the largest of GROUP_SIZES that divides the input size (`int4_group_size`; the layer's
    `group_size` says which). `quant.calibration.quantize_model` does better with
    calibration text."""
    check_scheme(scheme, group_size)
    if scheme.startswith("fp8"):
        return Fp8Linear(*quantize_fp8(weight, per_channel=scheme == "fp8-channel"))
    if scheme == "int8":
        return Int8Linear(*quantize_int8(weight))
    q, scales_zeros = quantize_int4(weight, group_size)
    return Int4Linear(pack_int4(q), scales_zeros)


@torch.no_grad()
def quantized_weight(weight: torch.Tensor, scheme: str, group_size: int = 128) -> torch.Tensor:
    """`weight` as the layer `quantize_linear(weight, scheme, group_size)` multiplies by,
    in fp32: the fake quantization of quantization-aware training. It goes through that
    layer and its own dequantization, so a QAT model and its quantized checkpoint compute
    with the same numbers by construction."""
    layer = quantize_linear(weight, scheme, group_size)
    assert isinstance(layer, (Fp8Linear, Int8Linear, Int4Linear))
    return layer.dequantize(0, layer.out_features)


# The buffers of each quantized layer type that hold one entry (or row) per output.
_ROW_BUFFERS: dict[type, tuple[str, ...]] = {
    Int4Linear: ("weight", "scales_zeros"),
    Int8Linear: ("weight", "weight_scale"),
    Fp8Linear: ("weight", "weight_scale"),
}


def fuse_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One quantized layer computing the outputs of `layers` (which share their input)
    stacked, or None where they cannot be stacked. Each of `layers` is left holding views of
    the fused buffers, so no memory is added; one product replaces several (q, k and v; or
    the gate and up projections)."""
    kind = type(layers[0])
    if kind not in _ROW_BUFFERS or any(type(layer) is not kind for layer in layers):
        return None
    fused: Int4Linear | Int8Linear | Fp8Linear
    if int4 := [x for x in layers if isinstance(x, Int4Linear)]:
        if len({x.group_size for x in int4}) > 1:
            return None
        scales = torch.cat([x.scales_zeros for x in int4]).transpose(0, 1)
        fused = Int4Linear(torch.cat([x.weight for x in int4]), scales)
    elif int8 := [x for x in layers if isinstance(x, Int8Linear)]:
        fused = Int8Linear(
            torch.cat([x.weight for x in int8]), torch.cat([x.weight_scale for x in int8])
        )
    else:
        fp8 = [x for x in layers if isinstance(x, Fp8Linear)]
        if len({None if x.input_scale is None else float(x.input_scale) for x in fp8}) > 1:
            return None
        per_row = [x.weight_scale.reshape(-1).expand(x.out_features) for x in fp8]
        fused = Fp8Linear(
            torch.cat([x.weight for x in fp8]), torch.cat(per_row), fp8[0].input_scale
        )
    start = 0
    for layer in layers:
        end = start + int(layer.weight.shape[0])  # type: ignore[index]
        for name in _ROW_BUFFERS[kind]:
            setattr(layer, name, getattr(fused, name)[start:end])
        start = end
    return fused


def layer_scheme(name: str, scheme: str) -> str:
    """The scheme weight `name` gets when a model is quantized to `scheme`: the LM head
    stays int8 under int4, as llama.cpp keeps its output matrix in 6 bits under its 4-bit
    types (on SmolLM2 an int4 head alone costs 2.7% of perplexity, an int8 one 0.1%)."""
    return "int8" if scheme == "int4" and name in ("output", "output.weight") else scheme


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
    "fuse_rows",
    "int4_group_size",
    "is_linear_weight",
    "layer_scheme",
    "quantize_linear",
    "quantized_weight",
]
