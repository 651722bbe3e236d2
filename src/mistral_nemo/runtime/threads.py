"""Who gets the CPU cores: torch's OpenMP workers or the kernels' pool.

Both pools spin for a while after their work, so running them side by side halves the
speed of each. During a decode step that the kernels do, torch's own ops are tiny and run
on the calling thread, and the kernels get every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mistral_nemo import kernels

_held = False  # one_token_steps is in force (it does not nest)


@contextmanager
def one_token_steps(enabled: bool = True) -> Iterator[None]:
    """Keep torch to one thread and give the kernels all of them, while `enabled` (measured:
    an 8-layer int4 NeMo decoded 1.5x slower with both pools spinning). Sampling belongs
    inside too: torch's idle workers would take the cores from the next step's kernels."""
    global _held
    n = torch.get_num_threads()
    if not enabled or n == 1 or _held:
        yield
        return
    _held = True
    kernels.set_threads(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        kernels.set_threads(None)
        _held = False


def before_large_ops() -> None:
    """Send the kernels' workers to sleep now rather than after their spin (about a
    millisecond): torch's threads are about to run large matmuls (a prefill)."""
    kernels.pool_sleep()
