"""Each scheme's grid of representable weights, and the search for its scales.

- int4, per group: Q4_1's min/max grid (so weights already on such a grid are reproduced
  exactly); with calibration, scales around it too (llama.cpp's make_qkx search for Q4_K),
  each refitted to its rounding by least squares weighted by the activations each column
  multiplies, the best one kept. (scale, zero) in fp16, as Q4_1 keeps its d and m.
- int8 and FP8, per output row (or per tensor): the absmax scale.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# int4: candidate inverse scales (15 + INT4_STEPS[i]) / (max - min), as make_qkx2 tries.
INT4_STEPS = torch.linspace(-1.0, 1.0, 11).tolist()


def fp8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale as E4M3 (saturating)."""
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def int8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).round().clamp(-127, 127).to(torch.int8)


def absmax_scales(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The scale of each row of w [rows, cols] for "int8" or "fp8" that maps its largest
    weight to the grid's end: [rows] fp32. (Shrinking it for the least squared error
    lowers the weights' error by ~3% but clips the outliers, and perplexity suffers.)"""
    qmax = 127.0 if scheme == "int8" else FP8_MAX
    return w.abs().amax(dim=1).clamp(min=1e-12) / qmax


def int4_min_max(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups [..., group] ([..., 1] each, fp32 values fp16 can hold) on
    Q4_1's grid: min to max in 15 steps. Without calibration this is the safer grid: the
    search below, unweighted by activations, clips the largest weights, and on SmolLM2's
    LM head (whose inputs have a few very large channels) that doubled the logits' KL."""
    lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    return _fp16_grid((hi - lo) / 15, lo)


def _fp16_grid(scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero = low + 8 scale) rounded to fp16, as they are stored."""
    scale = scale.clamp(min=0).to(torch.float16).float()
    return scale, (low + 8 * scale).to(torch.float16).float()


def int4_fit(groups: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups [..., group] like `int4_min_max`, searched for the least
    error weighted by `importance` [group] (or broadcastable) from calibration: with it,
    the outputs' error of SmolLM2's layers is 2.4x lower than min/max's at groups of 64."""
    flat = groups.reshape(-1, groups.shape[-1])
    column = importance.expand_as(groups).reshape(flat.shape)
    fits = [
        _int4_fit(flat[i : i + _FIT_ROWS], column[i : i + _FIT_ROWS])
        for i in range(0, len(flat), _FIT_ROWS)
    ]
    scale, zero = (torch.cat(t).reshape(*groups.shape[:-1], 1) for t in zip(*fits, strict=True))
    return scale, zero


# Groups searched at a time: their temporaries stay in the caches (several times faster).
_FIT_ROWS = 4096


def _int4_fit(groups: torch.Tensor, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Each weight's error counts in proportion to rms + |w| (make_qkx2's weights): plain
    # least squares clips the largest weights more.
    weight = (groups.square().mean(dim=-1, keepdim=True).sqrt_() + groups.abs()) * column
    lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    span = (hi - lo).clamp(min=1e-12)
    scale, low = span / 15, lo  # Q4_1's grid, kept unless a search candidate beats it
    error = _int4_error(groups, weight, scale, low)
    for step in INT4_STEPS:
        q = (groups - lo).mul_((15 + step) / span).round_().clamp_(0, 15)
        s, m = _least_squares(groups, weight, q)
        e = _int4_error(groups, weight, s, m)
        better = e < error
        scale, low = torch.where(better, s, scale), torch.where(better, m, low)
        error = torch.where(better, e, error)
    return _fp16_grid(scale, low)


def int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = 0..15 (int32) of groups [..., group] on the grid (q - 8) * scale + zero."""
    safe = torch.where(scale > 0, scale, 1.0)
    return ((groups - zero) / safe + 8).round_().clamp_(0, 15).to(torch.int32)


def _int4_error(
    groups: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> torch.Tensor:
    """Weighted squared error of rounding groups to low + q * scale (q = 0..15)."""
    safe = torch.where(scale > 0, scale, 1.0)
    q = (groups - low).div_(safe).round_().clamp_(0, 15)
    err = q.mul_(scale).add_(low).sub_(groups).square_()
    return err.mul_(weight).sum(dim=-1, keepdim=True)


def _least_squares(
    groups: torch.Tensor, weight: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, low) minimizing sum weight * (q * scale + low - groups)^2 for fixed q."""
    wq = weight * q
    sw, sx = weight.sum(-1, keepdim=True), (weight * groups).sum(-1, keepdim=True)
    sq, sqq, sqx = wq.sum(-1, True), (wq * q).sum(-1, True), (wq * groups).sum(-1, True)
    det = sw * sqq - sq * sq
    ok = det > 0  # q all equal: no scale to fit
    det = torch.where(ok, det, 1.0)
    scale = torch.where(ok, (sw * sqx - sx * sq) / det, 0.0)
    low = torch.where(ok, (sqq * sx - sq * sqx) / det, sx / sw.clamp(min=1e-30))
    return scale, low
