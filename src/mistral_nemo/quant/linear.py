"""Quantized linear layers: FP8 (E4M3), int8 per channel, int4 per group.

Each keeps its weights quantized in memory and multiplies without materializing a full
bf16 copy: FP8 through torch._scaled_mm on CUDA GPUs that have it, through the GEMV
kernel for one token on the CPU, and tile by tile otherwise; int8 and int4 through torch's
CPU kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu), and a dequantizing
fallback elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mistral_nemo import kernels
from mistral_nemo.errors import ConfigError
from mistral_nemo.kernels.decoder import LinearSpec
from mistral_nemo.quant import grids
from mistral_nemo.quant.grids import FP8, FP8_MAX

GROUP_SIZES = (32, 64, 128)
# Rows dequantized at a time by the FP8 fallback for several tokens: bounds the temporary.
_TILE_ROWS = 2048


# Weights are quantized this many rows at a time: NeMo's 131072 x 5120 LM head in fp32
# with its temporaries would otherwise need ~10 GB at once.
_CHUNK_ROWS = 2048


def _row_chunks(w: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        yield rows, w[rows].float()


def quantize_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weights and fp32 scales (one, or one per output row) with w ~ q * scale."""
    amax = torch.cat([grids.absmax_scales(c, "fp8") for _, c in _row_chunks(w)])
    scale = amax if per_channel else amax.max().reshape(1)
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    for rows, c in _row_chunks(w):
        q[rows] = grids.fp8_round(c, scale[rows, None] if per_channel else scale)
    return q, scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and fp32 scales."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = []
    for rows, c in _row_chunks(w):
        scale = grids.absmax_scales(c, "int8")
        q[rows] = grids.int8_round(c, scale[:, None])
        scales.append(scale)
    return q, torch.cat(scales)


def int4_group_size(cols: int, group_size: int) -> int:
    """The group size int4 uses for rows of `cols` inputs: `group_size` where it divides
    cols, else the largest of GROUP_SIZES below it that does (SmolLM2's 576-wide layers take
    groups of 64 when 128 is asked for)."""
    fits = [g for g in GROUP_SIZES if g <= group_size and cols % g == 0]
    if not fits:
        raise ConfigError(
            f"int4 needs the input size ({cols}) to be a multiple of {min(GROUP_SIZES)}"
        )
    return max(fits)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `int4_group_size(cols, group_size)` input columns:
    values 0..15 (int32, not packed) and [groups, out, 2] (scale, zero) fp16 with
    w ~ (q - 8) * scale + zero, min to max per group (`grids.int4_min_max`)."""
    cols = w.shape[1]
    group_size = int4_group_size(cols, group_size)
    q = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    parts = []
    for rows, c in _row_chunks(w):
        g = c.reshape(c.shape[0], cols // group_size, group_size)
        scale, zero = grids.int4_min_max(g)
        q[rows] = grids.int4_codes(g, scale, zero).reshape(c.shape)
        parts.append(torch.cat([scale, zero], dim=-1))
    return q, torch.cat(parts).transpose(0, 1).to(torch.float16).contiguous()


def _needs_grad(x: torch.Tensor) -> bool:
    """Whether a gradient must flow back to x (training through a frozen quantized layer,
    as QLoRA does): then only differentiable ops, not the kernels, torch's int8 matmul or
    _scaled_mm, which have no backward."""
    return torch.is_grad_enabled() and x.requires_grad


def _few_rows(x: torch.Tensor, in_features: int) -> torch.Tensor | None:
    """x as [rows, in_features] where the CPU kernels take it (up to
    kernels.MAX_BATCH_QUANTIZED rows: beyond, dequantizing the weights for torch's matmul is
    cheaper; and not when a gradient must flow back to x, which the kernels do not keep);
    otherwise None."""
    limit = kernels.MAX_BATCH_QUANTIZED * in_features
    if x.device.type != "cpu" or not 0 < x.numel() <= limit:
        return None
    if _needs_grad(x):
        return None
    return x.reshape(-1, in_features)


def tiled_linear(
    x: torch.Tensor, out_features: int, tile: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """x @ W.T with W dequantized `_TILE_ROWS` rows at a time by `tile(start, end)`, so that
    the full-precision weight never exists at once."""
    parts = [
        F.linear(x, tile(start, min(start + _TILE_ROWS, out_features)).to(x.dtype))
        for start in range(0, out_features, _TILE_ROWS)
    ]
    return torch.cat(parts, dim=-1)


class Fp8Linear(nn.Module):
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        if x.device.type == "cuda" and _scaled_mm_works(x.device) and not _needs_grad(x):
            return self._scaled_mm(x)
        if (rows := _few_rows(x, self.in_features)) is not None and kernels.available(FP8):
            out = kernels.gemv(w, rows.squeeze(0)) * scale
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return tiled_linear(x, self.out_features, self.dequantize)

    def kernel_spec(self) -> LinearSpec:
        return LinearSpec(self.weight, self.weight_scale)

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        scale = self.weight_scale
        if scale.numel() > 1:
            scale = scale[start:end, None]
        return self.weight[start:end].float() * scale

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:  # static activation scale
            x_scale = self.input_scale.reshape(1, 1)
        else:  # dynamic, per tensor
            x_scale = (x2.abs().amax().float().clamp(min=1e-12) / FP8_MAX).reshape(1, 1)
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        w_scale = (
            self.weight_scale.reshape(1, -1)
            if self.weight_scale.numel() > 1
            else (self.weight_scale.reshape(1, 1))
        )
        if w_scale.numel() > 1:
            x_scale = x_scale.expand(x2.shape[0], 1).contiguous()
        out = torch._scaled_mm(
            xq,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=w_scale,
            out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16,
        )
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _scaled_mm_works(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Int8Linear(nn.Module):
    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.float())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (rows := _few_rows(x, self.in_features)) is not None and kernels.available(
            kernels.WeightKind.INT8
        ):
            out = kernels.gemv_int8(self.weight, self.weight_scale, rows)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not _needs_grad(x):
            out = torch._weight_int8pack_mm(
                x2.contiguous(), self.weight, self.weight_scale.to(x.dtype)
            )
        elif x.device.type == "cpu":  # torch's int8 kernel is ~30x slower with fp32 inputs
            out = tiled_linear(x2, self.out_features, self.dequantize)
        else:
            out = F.linear(x2, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def kernel_spec(self) -> LinearSpec:
        return LinearSpec(self.weight, self.weight_scale)

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        return self.weight[start:end].float() * self.weight_scale[start:end, None]


class Int4Linear(nn.Module):
    """Int4 weights as stored (two values a byte) with their (scale, zero) per group, given
    as [groups, out, 2]: the group size is in_features / groups. One token goes through
    the int4 GEMV kernel; several are dequantized tile by tile."""

    weight: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = self.in_features // scales_zeros.shape[0]
        if self.group_size not in GROUP_SIZES or self.in_features % self.group_size:
            raise ConfigError(
                f"int4 layer of {self.in_features} inputs with {scales_zeros.shape[0]} "
                f"groups: group sizes are {GROUP_SIZES}"
            )
        self.register_buffer("weight", packed)
        # [rows, groups, 2] fp16: each row's scales next to each other, as the kernel reads
        # them (checkpoints written before kept them in bf16: converted here).
        self.register_buffer(
            "scales_zeros", scales_zeros.to(torch.float16).transpose(0, 1).contiguous()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (rows := _few_rows(x, self.in_features)) is not None and kernels.available(
            kernels.WeightKind.INT4
        ):
            out = kernels.gemv_int4(self.weight, self.scales_zeros, self.group_size, rows)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return tiled_linear(x, self.out_features, self.dequantize)

    def kernel_spec(self) -> LinearSpec:
        return LinearSpec(self.weight, self.scales_zeros, self.group_size)

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        packed = self.weight[start:end]
        if packed.device.type == "cpu" and kernels.available(torch.float32):
            return kernels.dequantize_int4(packed, self.scales_zeros[start:end], self.group_size)
        q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        scale, zero = self.scales_zeros[start:end].float().unbind(-1)
        groups = (q.float() - 8).reshape(q.shape[0], -1, self.group_size)
        return (groups * scale[..., None] + zero[..., None]).reshape(q.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """0..15 values [rows, cols] into bytes [rows, cols/2], column 2i in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
