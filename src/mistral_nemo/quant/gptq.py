"""GPTQ (Frantar et al., 2022): weights rounded one input column at a time, each column's
rounding error spread over the columns not yet rounded in proportion to how the layer's
inputs correlate (the inverse of H = X^T X from calibration activations), so that the
layer's outputs, rather than its weights, stay close.

The grid of each group of columns is fitted when the rounding reaches it, to the weights as
the earlier errors have moved them; schemes with one scale per row fit it once, on the
weights as they are. The result is weights that lie on the scheme's grid, which its
quantizer (`quantize_linear`) then stores exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Columns rounded between two updates of the rest of the matrix (a matrix product each).
BLOCK = 128
# Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned.
DAMPING = 0.01

# A grid fitted to some columns: it rounds any one of them [rows] to the grid.
Rounder = Callable[[torch.Tensor], torch.Tensor]


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fit: Callable[[torch.Tensor], Rounder],
    group: int,
) -> torch.Tensor:
    """w [rows, cols] rounded with error feedback: `fit(columns)` gives the grid of each
    `group` of columns (group = cols: one grid for the matrix; else a divisor of BLOCK),
    `hessian` [cols, cols] is X^T X of the layer's inputs. Returns the rounded weights."""
    w = w.float().clone()
    cols = w.shape[1]
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that were never nonzero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    # The upper Cholesky factor of H^-1: row i holds how column i's error moves columns > i.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    inverse = inverse.float()
    rounder: Rounder | None = None
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        errors = torch.empty(w.shape[0], end - start)
        for i in range(start, end):
            if i % group == 0:
                rounder = fit(w[:, i : i + group])
            assert rounder is not None
            rounded = rounder(w[:, i])
            error = (w[:, i] - rounded) / inverse[i, i]
            w[:, i] = rounded
            w[:, i + 1 : end] -= error[:, None] * inverse[i, i + 1 : end]
            errors[:, i - start] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return w
