"""Quantizing a loaded model with calibration text: the inputs each linear layer sees on a
few thousand tokens give it H = X^T X, which GPTQ (`gptq`) uses to round the layer's
weights so that its outputs move least, and whose diagonal weights int4's search of each
group's grid toward the inputs that matter (`grids.int4_fit`).

Unlike `from_pretrained(..., quantize=...)`, which quantizes tensor by tensor as it reads,
this needs the full-precision model in memory first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from mistral_nemo.errors import ConfigError
from mistral_nemo.quant import check_scheme, grids, layer_scheme
from mistral_nemo.quant.gptq import Rounder, gptq
from mistral_nemo.quant.linear import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    int4_group_size,
    pack_int4,
)


def calibration_batches(tokens: Sequence[int], ctx: int, count: int = 32) -> list[torch.Tensor]:
    """Up to `count` consecutive windows [1, ctx] of a token stream."""
    return [
        torch.tensor(tokens[i : i + ctx])[None]
        for i in range(0, len(tokens) - ctx + 1, ctx)[:count]
    ]


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The full-precision linear layers quantization applies to, by name (the LM head as
    "output")."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and (name == "output" or ".attention.w" in name or ".feed_forward.w" in name)
    }


@torch.inference_mode()
def input_hessians(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """X^T X (float64 [in, in]) of the inputs of every linear layer over `batches` of tokens."""
    hessians: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202 (a forward hook)
        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            product = (x.T @ x).double()
            hessians[name] = hessians[name] + product if name in hessians else product

        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in _linear_layers(model).items()]
    try:
        for tokens in batches:
            model(tokens.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def quantize_model(
    model: nn.Module,
    scheme: str,
    group_size: int,
    calibration: Iterable[torch.Tensor],
    head_scheme: str | None = None,
) -> nn.Module:
    """Replace `model`'s linear layers and LM head by quantized ones rounded by GPTQ on the
    `calibration` token batches ([1, ctx] each, `calibration_batches`); the head in
    `head_scheme` where given (llama.cpp keeps it in 6 bits under its 4-bit types: on
    SmolLM2 an int4 head alone costs ~2% of perplexity). Returns model."""
    hessians = input_hessians(model, calibration)
    for name, module in _linear_layers(model).items():
        parent, _, attr = name.rpartition(".")
        kind = head_scheme if name == "output" and head_scheme else layer_scheme(name, scheme)
        layer = quantize_with_hessian(module.weight.detach(), kind, group_size, hessians[name])
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return model


def quantize_with_hessian(
    w: torch.Tensor, scheme: str, group_size: int, hessian: torch.Tensor
) -> nn.Module:
    """One weight [out, in] as a quantized layer, rounded by GPTQ with the X^T X of its
    inputs; int4's search of each group's grid is weighted by the inputs' mean squares."""
    if scheme == "int4":
        return _int4_gptq(w, int4_group_size(w.shape[1], group_size), hessian)
    return _per_row_gptq(w, scheme, hessian)


def _int4_gptq(w: torch.Tensor, group: int, hessian: torch.Tensor) -> Int4Linear:
    importance = (hessian.diagonal() / hessian.diagonal().mean().clamp(min=1e-30)).float()
    fitted: list[tuple[torch.Tensor, torch.Tensor]] = []

    def fit(columns: torch.Tensor) -> Rounder:
        start = len(fitted) * group
        scale, zero = grids.int4_fit(columns, importance[start : start + group])
        fitted.append((scale, zero))

        def round_column(col: torch.Tensor) -> torch.Tensor:
            codes = grids.int4_codes(col[:, None], scale, zero)
            return ((codes - 8) * scale + zero)[:, 0]

        return round_column

    rounded = gptq(w, hessian, fit, group)
    scale, zero = (torch.cat(t, dim=1) for t in zip(*fitted, strict=True))
    groups = rounded.reshape(w.shape[0], -1, group)
    codes = grids.int4_codes(groups, scale[..., None], zero[..., None]).reshape(w.shape)
    return Int4Linear(pack_int4(codes), torch.stack([scale, zero], -1).transpose(0, 1))


def _per_row_gptq(w: torch.Tensor, scheme: str, hessian: torch.Tensor) -> nn.Module:
    """int8, fp8-channel (a scale per row) or fp8 (one scale): absmax scales, fitted before
    any rounding."""
    kind = "int8" if scheme == "int8" else "fp8"
    round_ = grids.int8_round if kind == "int8" else grids.fp8_round
    scale = grids.absmax_scales(w.float(), kind)
    if scheme == "fp8":
        scale = scale.max().expand(w.shape[0])
    rounded = gptq(w, hessian, lambda _: lambda col: round_(col, scale).float() * scale, w.shape[1])
    q = round_(rounded, scale[:, None])
    if scheme == "int8":
        return Int8Linear(q, scale)
    return Fp8Linear(q, scale if scheme == "fp8-channel" else scale[:1])


def quantize_checkpoint_calibrated(
    src: str | Path,
    dst: str | Path,
    scheme: str,
    group_size: int,
    text: str,
    ctx: int = 512,
    count: int = 16,
) -> None:
    """Write a quantized copy of checkpoint `src` (Hugging Face layout) rounded by GPTQ on
    up to `count` windows of `ctx` tokens of `text`. Needs the model in fp32 in memory."""
    from mistral_nemo.checkpoint.reading import open_checkpoint
    from mistral_nemo.model import Transformer
    from mistral_nemo.tokenizer import load_tokenizer

    check_scheme(scheme, group_size)
    source = open_checkpoint(src)
    model = Transformer.from_pretrained(src, dtype=torch.float32)
    ctx = min(ctx, model.config.max_seq_len)
    batches = calibration_batches(load_tokenizer(src).encode(text, bos=True), ctx, count)
    if not batches:
        raise ConfigError(f"calibration text is shorter than one window of {ctx} tokens")
    quantize_model(model, scheme, group_size, batches)
    model.save_pretrained(dst, "hf", dtype=source.dtype, extra_files=source.companion_files())
