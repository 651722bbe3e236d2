"""CPU kernels for decoding, compiled on first use.

`linear(x, weight)` is `F.linear` except when one token's activations meet a large bf16 or
fp32 weight on the CPU outside autograd (the kernel streams the weight at memory speed; torch's
bf16 path reaches about two thirds of it), or a few dozen rows meet an fp32 weight (read
once for all of them). The quantized layers call `gemv_int4`, `gemv_int8` and `gemv` (fp8)
for up to MAX_BATCH_QUANTIZED rows, and `decoder.Decoder` runs a whole fp32 decode step of
several sequences in one call. The C files (csrc/) are built with the system C compiler and
-march=native into a per-user cache (`build`); without a compiler, without AVX-512, or with
MISTRAL_NEMO_CPU_KERNELS=0, everything goes through torch. A kernel that cannot get its
scratch memory raises MemoryError.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F

from mistral_nemo.kernels.build import build
from mistral_nemo.kernels.header import Library, WeightKind, check_allocation

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_QUANTIZED",
    "MAX_BATCH_SHORT_ROWS",
    "MAX_BATCH_UNTILED",
    "MIN_COLUMNS",
    "MIN_ELEMENTS",
    "WeightKind",
    "argmax",
    "available",
    "dequantize_int4",
    "fp32_rows",
    "gemv",
    "gemv_int4",
    "gemv_int8",
    "linear",
    "pool_sleep",
    "set_threads",
    "threads",
    "tiled",
]

_KINDS = {
    torch.bfloat16: WeightKind.BF16,
    torch.float32: WeightKind.FP32,
    torch.float8_e4m3fn: WeightKind.FP8,
}
# Below this many weight elements, the call costs more than torch's GEMV loses; below this
# row length, one vector's per-row reductions do (a tiny model's 64-wide LM head). With the
# worker pool, a 192x576 product already gains.
MIN_ELEMENTS = 1 << 16
MIN_COLUMNS = 512
# Rows of activations up to which the fp32 kernels, reading the weights once for all of them,
# beat torch's product: 1.1-6x for 2-8 rows of SmolLM2 and NeMo shapes, 1.5-2.9x for 16 rows
# of wide LM heads; at 32 rows about even on NeMo's widths, and behind past that.
MAX_BATCH = 32
# By rows shorter than MIN_COLUMNS (a small model's LM head), up to this many (1.5x at 64-128).
MAX_BATCH_SHORT_ROWS = 128
# Rows of activations up to which the quantized kernels (each weight row read once for all
# of them) beat dequantizing the weights for torch's product: measured 1.2-2.5x for 8-32 rows
# of SmolLM2 shapes, 8-25x of NeMo's (whose dequantized fp32 tiles alone cost ~180 ms for a
# 14336 x 5120 layer); about even at 64 rows of SmolLM2's.
MAX_BATCH_QUANTIZED = 32
# Without the tiles (AVX2 builds), each (row, vector) pair is a dot product of its own: on a
# 2-core AVX2 EPYC 1.1-4.5x torch's fp32 product for 4 rows of SmolLM2, NeMo and LM head
# shapes, behind it from 6 rows on for weights that fit the caches (SmolLM2's layers).
MAX_BATCH_UNTILED = 4


_threads: int | None = None  # None: as many as torch's


def set_threads(n: int | None) -> None:
    """Run the kernels on `n` threads, or with None on as many as torch uses
    (torch.get_num_threads(), the default)."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"the kernels need at least one thread, not {n}")
    _threads = n


def threads() -> int:
    """How many threads the kernels run on."""
    return torch.get_num_threads() if _threads is None else _threads


def pool_sleep() -> None:
    """Send the kernels' worker threads to sleep now rather than after their spin (about a
    millisecond): for when torch's own threads are about to run a large op (a spinning
    worker halves the speed of their matmuls)."""
    if (lib := _library()) is not None:
        lib.pool_sleep()


@cache
def _library() -> Library | None:
    if os.environ.get("MISTRAL_NEMO_CPU_KERNELS", "1") == "0":
        return None
    path = build()
    return None if path is None else Library(path)


@cache
def available(dtype: torch.dtype | WeightKind) -> bool:
    """Whether the vectorized kernel serves weights of `dtype` (or that kind: INT4, INT8) on
    this machine."""
    lib = _library()
    kind = dtype if isinstance(dtype, WeightKind) else _KINDS.get(dtype)
    return lib is not None and kind is not None and bool(lib.gemv_vectorized(kind))


def _run(
    entry: str, rows: int, inputs: list[torch.Tensor], sizes: list[int], batch: int = 1
) -> torch.Tensor:
    """Call C function `entry`(inputs..., out, sizes..., threads) for an fp32 out [rows], or
    [batch, rows]."""
    lib = _library()
    assert lib is not None
    out = torch.empty(rows if batch == 1 else (batch, rows), dtype=torch.float32)
    failed = getattr(lib, entry)(*(t.data_ptr() for t in inputs), out.data_ptr(), *sizes, threads())
    check_allocation(entry, failed)
    return out


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [rows, cols] @ x [cols] (or x [batch, cols] @ weight.T) in fp32, both contiguous
    CPU tensors: of one dtype, or float8_e4m3fn weights (unscaled) with x in bf16."""
    if weight.dtype == torch.float8_e4m3fn:
        x = x.to(torch.bfloat16).contiguous()
    rows, cols = weight.shape
    batch = x.numel() // cols
    return _run("gemv", rows, [weight, x], [rows, cols, batch, _KINDS[weight.dtype]], batch)


def gemv_int4(
    packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, x: torch.Tensor
) -> torch.Tensor:
    """Int4 weights (packed [rows, cols/2], (scale, zero) fp16 [rows, groups, 2]) @ x [cols]
    (-> [rows]) or x [batch, cols] (-> [batch, rows], each weight row read once for all).

    On VNNI machines, x is quantized to int8 per group for the products
    (as llama.cpp does on CPUs); otherwise the products are in bf16.
    """
    rows, cols = packed.shape[0], packed.shape[1] * 2
    xf = x.float().contiguous()
    batch = xf.numel() // cols
    sizes = [rows, cols, group_size, batch]
    return _run("gemv_int4", rows, [packed, xf, scales_zeros], sizes, batch)


def dequantize_int4(
    packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The fp32 weights [rows, cols] of int4 rows stored as in `gemv_int4`, about 5x faster
    than the same in torch ops. On the calling thread: this runs between torch's matmuls,
    whose idle threads spin and would halve the speed of the pool's (measured: 512-token
    SmolLM2 prefill 1.23 s with the pool, 0.86 s without)."""
    lib = _library()
    assert lib is not None
    rows, cols = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(rows, cols)
    lib.dequantize_int4(
        packed.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), rows, cols, group_size, 1
    )  # fmt: skip
    return out


def gemv_int8(weight: torch.Tensor, row_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Int8 weights [rows, cols] times fp32 row scales @ x ([cols] or [batch, cols], as in
    `gemv_int4`), with x quantized to int8 per group of 128 columns for the VNNI products."""
    rows, cols = weight.shape
    xf = x.float().contiguous()
    batch = xf.numel() // cols
    return _run("gemv_int8", rows, [weight, xf, row_scale], [rows, cols, batch], batch)


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """The index of the largest value of each row of x [rows, cols] (fp32, contiguous, on
    the CPU) as numpy's argmax gives it, on the worker threads; None where the kernels are
    unavailable (or rows are empty: numpy's error)."""
    lib = _library()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        return None
    if x.shape[1] == 0:
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), threads())
    return out


def fp32_rows(cols: int) -> int:
    """How many rows of activations the kernels' fp32 products take, by rows of `cols`."""
    if not tiled():
        return MAX_BATCH_UNTILED
    return MAX_BATCH if cols >= MIN_COLUMNS else MAX_BATCH_SHORT_ROWS


@cache
def tiled() -> bool:
    """Whether fp32 products of many vectors run in tiles here (AVX-512 builds)."""
    lib = _library()
    return lib is not None and bool(lib.gemv_tiled())


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, through the GEMV kernel where it pays: one row of x
    by rows of MIN_COLUMNS or more, or several by fp32 weights (`fp32_rows`)."""
    rows = x.numel() // weight.shape[-1]
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and (
            (rows == 1 and weight.shape[-1] >= MIN_COLUMNS)
            or (1 < rows <= fp32_rows(weight.shape[-1]) and weight.dtype == torch.float32)
        )
        and weight.numel() >= MIN_ELEMENTS
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available(weight.dtype)
    ):
        out = gemv(weight, x.contiguous().view(rows, -1).squeeze(0))
        return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
