"""Lazy, memory-mapped reading and streaming writing of safetensors files.

Reading goes through the safetensors library: `get_tensor` returns a view of a private
memory map, so a tensor costs no RAM until it is touched. Each tensor is opened on its own
handle, so pages read to convert a tensor are unmapped as soon as that tensor is dropped.

Writing streams one tensor at a time (the header is computed from shapes up front), where
`safetensors.torch.save_file` would first serialize every tensor to bytes in memory.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from mistral_nemo.errors import CheckpointError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor in a safetensors file, known by its header until `load` maps it."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        try:
            with safe_open(str(self.file), framework="pt") as f:
                return f.get_tensor(self.name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name!r}: {e}") from None


def scan(file: Path) -> dict[str, LazyTensor]:
    """The tensors a file holds, from its header; a truncated or corrupt file raises."""
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                info = f.get_slice(name)
                dtype = _DTYPES_BY_NAME.get(info.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has unsupported dtype {info.get_dtype()}"
                    )
                out[name] = LazyTensor(file, name, dtype, tuple(info.get_shape()))
            return out
    except SafetensorError as e:
        raise CheckpointError(
            f"{file}: not a valid safetensors file (truncated or corrupt?): {e}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot open: {e}") from None


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its header facts now, its data when `produce` is called."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def write(
    file: Path, tensors: dict[str, TensorSource], on_tensor: Callable[[str], None] | None = None
) -> None:
    """Write `tensors` as one safetensors file, producing and writing them one by one."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, src in tensors.items():
        nbytes = math.prod(src.shape) * torch.empty((), dtype=src.dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[src.dtype],
            "shape": list(src.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, src in tensors.items():
            _write_tensor(f, name, src)
            if on_tensor:
                on_tensor(name)


def _write_tensor(f: BinaryIO, name: str, src: TensorSource) -> None:
    t = src.produce()
    if tuple(t.shape) != tuple(src.shape) or t.dtype != src.dtype:
        raise CheckpointError(
            f"tensor {name!r}: produced {tuple(t.shape)} {t.dtype}, "
            f"expected {src.shape} {src.dtype}"
        )
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    f.write(data.numpy().data)
