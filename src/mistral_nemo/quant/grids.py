"""Each scheme's grid of representable weights, and the search for its scales.

A grid is fitted to a block of weights by least squares, optionally weighted per input
column by `importance` (the mean square of the activations each column multiplies, from
calibration: an error on a column that sees large inputs costs more):
- int4, per group: Q4_1's min/max grid (so weights already on such a grid are reproduced
  exactly), then scales around it (llama.cpp's make_qkx search for Q4_K), each refitted to
  its rounding by weighted least squares, the best one kept; (scale, zero) in fp16, as Q4_1
  keeps its d and m.
- int8 and FP8, per output row (or per tensor): the absmax scale shrunk by a few factors,
  the one with the least error kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Candidate shrink factors of the absmax scale of int8 and FP8 rows.
ROW_SHRINK = torch.linspace(1.0, 0.8, 11).tolist()
# int4: candidate inverse scales (15 + INT4_STEPS[i]) / (max - min), as make_qkx2 tries.
INT4_STEPS = torch.linspace(-1.0, 1.0, 11).tolist()


def fp8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale as E4M3 (saturating)."""
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def int8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).round().clamp(-127, 127).to(torch.int8)


def row_scales(
    w: torch.Tensor, scheme: str, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """The scale of each row of w [rows, cols] for "int8" or "fp8" with the least
    (importance-weighted) squared error among shrunk absmax scales: [rows] fp32."""
    qmax, round_ = (127.0, int8_round) if scheme == "int8" else (FP8_MAX, fp8_round)
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    best, best_err = amax / qmax, None
    for factor in ROW_SHRINK:
        scale = amax * factor / qmax
        err = _weighted(w - round_(w, scale[:, None]).float() * scale[:, None], importance)
        if best_err is None:
            best_err = err
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def tensor_scale(
    chunks: Callable[[], Iterable[torch.Tensor]], importance: torch.Tensor | None = None
) -> torch.Tensor:
    """One FP8 scale for all the rows `chunks()` yields (fp32 [rows, cols] pieces of one
    weight, read once per candidate), the shrunk absmax with the least squared error: [1]."""
    amax = torch.stack([c.abs().amax() for c in chunks()]).amax().clamp(min=1e-12)

    def error(scale: torch.Tensor) -> float:
        return sum(
            float(_weighted(c - fp8_round(c, scale).float() * scale, importance).sum())
            for c in chunks()
        )

    return min((amax * f / FP8_MAX for f in ROW_SHRINK), key=error).reshape(1)


def _weighted(err: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Sum over the last dimension of err^2, weighted by column importance."""
    sq = err.square()
    return (sq if importance is None else sq * importance).sum(dim=-1)


def int4_fit(
    groups: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups [..., group] (fp32 values fp16 can hold, [..., 1] each) with
    w ~ (q - 8) * scale + zero, q = 0..15; `importance` [group] or broadcastable."""
    flat = groups.reshape(-1, groups.shape[-1])
    weight = None if importance is None else importance.reshape(-1, groups.shape[-1])
    fits = [_int4_fit(flat[i : i + _FIT_ROWS], weight) for i in range(0, len(flat), _FIT_ROWS)]
    scale, zero = (torch.cat(t).reshape(*groups.shape[:-1], 1) for t in zip(*fits, strict=True))
    return scale, zero


# Groups searched at a time: their temporaries stay in the caches (several times faster).
_FIT_ROWS = 4096


def _int4_fit(
    groups: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    scale = scale.clamp(min=0).to(torch.float16).float()
    return scale, (low + 8 * scale).to(torch.float16).float()


def int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = 0..15 (int32) of groups [..., group] on the grid (q - 8) * scale + zero."""
    safe = torch.where(scale > 0, scale, 1.0)
    return ((groups - zero) / safe + 8).round_().clamp_(0, 15).to(torch.int32)


def _int4_error(
    groups: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, low: torch.Tensor
) -> torch.Tensor:
    """Weighted squared error of rounding groups to low + q * scale (q = 0..15)."""
    safe = torch.where(scale > 0, scale, 1.0)
    q = (groups - low).div_(safe).round_().clamp_(0, 15)
    err = q.mul_(scale).add_(low).sub_(groups).square_()
    return (err if weight is None else err.mul_(weight)).sum(dim=-1, keepdim=True)


def _least_squares(
    groups: torch.Tensor, weight: torch.Tensor | None, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, low) minimizing sum weight * (q * scale + low - groups)^2 for fixed q."""
    wq = q if weight is None else weight * q
    sw = torch.full_like(q[..., :1], q.shape[-1]) if weight is None else weight.sum(-1, True)
    sx = (groups if weight is None else weight * groups).sum(-1, keepdim=True)
    sq, sqq, sqx = wq.sum(-1, True), (wq * q).sum(-1, True), (wq * groups).sum(-1, True)
    det = sw * sqq - sq * sq
    ok = det > 0  # q all equal: no scale to fit
    det = torch.where(ok, det, 1.0)
    scale = torch.where(ok, (sw * sqx - sx * sq) / det, 0.0)
    low = torch.where(ok, (sqq * sx - sq * sqx) / det, sx / sw.clamp(min=1e-30))
    return scale, low
