"""The C kernels' interface as Python sees it, read from csrc/kernels.h alone.

cffi parses the header's interface section: the weight kinds, the structs a decode step
reads (`ffi.new("layer_t[]", n)` lays them out as the compiler does) and the entry points'
signatures, so Python keeps no copy of any of them. The calls go through ctypes, typed from
those signatures: cffi's own calls take pointers only as cdata, and casting each tensor's
address to one made a small call about 20% slower than ctypes' (1.10 vs 0.94 us).
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from pathlib import Path
from typing import Any

import cffi

SOURCES = Path(__file__).with_name("csrc")
_HEADER = SOURCES / "kernels.h"
_BEGIN, _END = "/* ==== The interface", "/* ==== End of the interface"


def _interface() -> str:
    text = _HEADER.read_text()
    return text[text.index(_BEGIN) : text.index(_END)]


ffi = cffi.FFI()
ffi.cdef(_interface())

_HEADER_KINDS: dict[str, int] = {
    name.removeprefix("KIND_"): value
    for name, value in ffi.typeof("enum weight_kind").relements.items()
}


class WeightKind(IntEnum):
    """`enum weight_kind` of kernels.h: the kinds of weights the products take (a weight's
    dtype alone does not say int4 from packed bytes)."""

    BF16 = _HEADER_KINDS["BF16"]
    FP32 = _HEADER_KINDS["FP32"]
    FP8 = _HEADER_KINDS["FP8"]
    INT4 = _HEADER_KINDS["INT4"]
    INT8 = _HEADER_KINDS["INT8"]


def check_allocation(entry: str, failed: int) -> None:
    """Raise MemoryError where entry point `entry` returned `failed`: the size in bytes of the
    scratch memory it could not get (0: it ran)."""
    if failed:
        raise MemoryError(f"CPU kernel {entry}: out of memory allocating {failed} bytes of scratch")


_UINTPTR = ffi.typeof("uintptr_t")


def address(data: Any) -> int:
    """The address of cdata from `ffi.new`, for a ctypes pointer argument."""
    return int(ffi.cast(_UINTPTR, data))


_PRIMITIVES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}


def _ctype(declared: Any) -> Any:
    if declared.kind == "pointer":
        return ctypes.c_void_p
    if declared.kind == "enum":
        return ctypes.c_int
    if declared.kind == "void":
        return None
    return _PRIMITIVES[declared.cname]


class Library:
    """The built library, its entry points typed as kernels.h declares them (on first use:
    a build without a kernel, such as gemv_int8 without VNNI, lacks its symbol)."""

    def __init__(self, path: Path) -> None:
        self._functions = ctypes.CDLL(str(path))
        self._declared = ffi.dlopen(str(path))

    def __getattr__(self, name: str) -> Any:
        function = getattr(self._functions, name)
        declared = ffi.typeof(getattr(self._declared, name))
        function.argtypes = [_ctype(arg) for arg in declared.args]
        function.restype = _ctype(declared.result)
        setattr(self, name, function)  # found directly from now on
        return function
