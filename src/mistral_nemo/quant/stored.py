"""How quantized linear layers are stored in checkpoint files.

Tensors of a layer `X` (its `X.weight` plus companions):

| scheme      | X.weight               | companions                                        |
| ----------- | ---------------------- | ------------------------------------------------- |
| fp8         | float8_e4m3fn [N, K]   | X.weight_scale fp32 [] (AutoFP8), X.input_scale [] |
| fp8-channel | float8_e4m3fn [N, K]   | X.weight_scale fp32 [N, 1]                        |
| int8        | int8 [N, K]            | X.weight_scale fp32 [N]                           |
| int4        | uint8 [N, K/2]         | X.weight_scales_zeros fp16 [K/g, N, 2]            |

int4 packs two 0..15 values per byte, the even column in the low nibble; each group of g
columns has its (scale, zero) with w = (q - 8) * scale + zero. g is the checkpoint's group
size, or for a layer whose K it does not divide the largest of 32, 64, 128 that does
(`int4_group_size`): a layer's own g is K / the first dimension of its scales. Files
written before kept the scales in bf16; they load (converted to fp16). FP8 is the layout
of the community NeMo FP8 checkpoints (config.json `quantization_config.quant_method:
"fp8"`), which vLLM loads; Mistral's consolidated FP8 files name the scales
`qscale_weight` and `qscale_act`, read here as `weight_scale` and `input_scale`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistral_nemo.errors import CheckpointError
from mistral_nemo.quant.linear import (
    FP8,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    int4_group_size,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

COMPANIONS = ("weight_scale", "input_scale", "weight_scales_zeros")
MISTRAL_NAMES = {"qscale_weight": "weight_scale", "qscale_act": "input_scale"}


def quantized_tensors(w: torch.Tensor, scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    """The stored tensors of weight `w` under `scheme`, by suffix."""
    if scheme.startswith("fp8"):
        q, scale = quantize_fp8(w, per_channel=scheme == "fp8-channel")
        return {
            "weight": q,
            "weight_scale": scale.reshape(-1, 1) if scheme == "fp8-channel" else scale.reshape(()),
        }
    if scheme == "int8":
        q8, scale = quantize_int8(w)
        return {"weight": q8, "weight_scale": scale}
    q4, scales_zeros = quantize_int4(w, group_size)
    return {"weight": pack_int4(q4), "weight_scales_zeros": scales_zeros}


QUANTIZED_LAYERS = (Fp8Linear, Int8Linear, Int4Linear)


def scheme_of(layer: nn.Module) -> tuple[str, int]:
    """(scheme, group size) of a quantized layer."""
    if isinstance(layer, Int4Linear):
        return "int4", layer.group_size
    if isinstance(layer, Int8Linear):
        return "int8", 128
    if isinstance(layer, Fp8Linear):
        return ("fp8-channel" if layer.weight_scale.numel() > 1 else "fp8"), 128
    raise TypeError(f"not a quantized layer: {type(layer).__name__}")


def stored_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The stored tensors of a quantized layer (one built by GPTQ, say), by suffix: the
    inverse of `layer_from_stored`."""
    if isinstance(layer, Int4Linear):
        return {"weight": layer.weight, "weight_scales_zeros": layer.scales_zeros.transpose(0, 1)}
    if isinstance(layer, Int8Linear):
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}
    if isinstance(layer, Fp8Linear):
        per_channel = layer.weight_scale.numel() > 1
        scale = layer.weight_scale.reshape(-1, 1) if per_channel else layer.weight_scale.reshape(())
        return {"weight": layer.weight, "weight_scale": scale}
    raise TypeError(f"not a quantized layer: {type(layer).__name__}")


def stored_shapes(
    scheme: str, shape: tuple[int, ...], group_size: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    rows, cols = shape
    if scheme == "fp8":
        return {"weight": (shape, FP8), "weight_scale": ((), torch.float32)}
    if scheme == "fp8-channel":
        return {"weight": (shape, FP8), "weight_scale": ((rows, 1), torch.float32)}
    if scheme == "int8":
        return {"weight": (shape, torch.int8), "weight_scale": ((rows,), torch.float32)}
    groups = cols // int4_group_size(cols, group_size)
    return {
        "weight": ((rows, cols // 2), torch.uint8),
        "weight_scales_zeros": ((groups, rows, 2), torch.float16),
    }


def layer_from_stored(
    tensors: dict[str, torch.Tensor], scheme: str, group_size: int, where: str
) -> nn.Module:
    # The stored tensors say the layer's kind: a checkpoint's scheme has exceptions (an
    # int4 model's LM head is int8, `layer_scheme`).
    if "weight_scales_zeros" not in tensors and scheme == "int4":
        scheme = "int8"
    try:
        if scheme.startswith("fp8"):
            return Fp8Linear(
                tensors["weight"], tensors["weight_scale"].reshape(-1), tensors.get("input_scale")
            )
        if scheme == "int8":
            return Int8Linear(tensors["weight"], tensors["weight_scale"].reshape(-1))
        packed, scales = tensors["weight"], tensors["weight_scales_zeros"]
        rows, half = packed.shape
        expected = stored_shapes(scheme, (rows, 2 * half), group_size)["weight_scales_zeros"][0]
        if tuple(scales.shape) != expected:
            raise CheckpointError(
                f"{where}: int4 scales of shape {list(scales.shape)}, the group size "
                f"implies {list(expected)}"
            )
        return Int4Linear(packed, scales)
    except KeyError as e:
        raise CheckpointError(f"{where}: quantized layer lacks its {e.args[0]} tensor") from None


def permute_rows(tensors: dict[str, torch.Tensor], permute: Any) -> dict[str, torch.Tensor]:
    """Apply a row permutation of the weight (RoPE layouts) to all of a layer's tensors."""
    out = {}
    for suffix, t in tensors.items():
        if suffix == "weight_scales_zeros":
            out[suffix] = (
                permute(t.transpose(0, 1).flatten(1))
                .reshape(t.shape[1], t.shape[0], 2)
                .transpose(0, 1)
                .contiguous()
            )
        elif t.dim() == 2 or (suffix == "weight_scale" and t.numel() > 1):
            out[suffix] = permute(t.reshape(t.shape[0], -1)).reshape(t.shape)
        else:
            out[suffix] = t
    return out


def scheme_from_config(config: dict[str, Any]) -> tuple[str, int] | None:
    """(scheme, group size) from config.json's quantization_config or params.json's
    quantization; None for a checkpoint that is not quantized."""
    q = config.get("quantization_config") or config.get("quantization")
    if not q:
        return None
    method = q.get("quant_method") or q.get("qformat_weight")
    if method in ("fp8", "fp8_e4m3"):
        return ("fp8-channel" if q.get("weight_per_channel") else "fp8"), 128
    if method == "mistral-nemo" and q.get("scheme") in ("int8", "int4", "fp8", "fp8-channel"):
        return q["scheme"], int(q.get("group_size", 128))
    raise CheckpointError(
        f"unsupported quantization {q!r}: this loader reads fp8 (AutoFP8 "
        "or Mistral consolidated) and mistral-nemo int8/int4 checkpoints"
    )


def quantization_config(scheme: str, group_size: int) -> dict[str, Any]:
    if scheme.startswith("fp8"):
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "ignored_layers": [],
            "weight_per_channel": scheme == "fp8-channel",
        }
    return {"quant_method": "mistral-nemo", "scheme": scheme, "group_size": group_size}
