"""llama.cpp through llama-cpp-python, as the tests and benchmarks load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_llama(path: str | Path, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(path, **kwargs)` without llama.cpp's extra CPU buffer types: some
    0.3.36 builds crash in the AMX one of those on this CPU, and plain buffers take the same
    arithmetic path on every build. (Llama() builds its model parameters from
    `llama_model_default_params`, so passing use_extra_bufts to it does nothing.)"""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def float32_copy(path: str | Path, out: Path) -> Path:
    """The GGUF with every tensor dequantized to float32 by llama.cpp's own quantizer: on
    it llama.cpp multiplies in float32 (on a quantized file it rounds activations to 8 bits
    for its dot products, which moves a perplexity by ~1%)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not dequantize {path}")
    return out
