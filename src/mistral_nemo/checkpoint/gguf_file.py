"""GGUF files (llama.cpp's format) of llama-family models: read and write.

llama.cpp runs Mistral NeMo as architecture `llama`; tensors are in our (Mistral) layout
under their GGUF names (`layouts`). Quantized tensors (Q8_0, Q4_K, ...) are dequantized one at a
time by the `gguf` package as the model loads; the file itself stays memory-mapped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mistral_nemo.checkpoint.layouts import gguf_name, mistral_name_of_gguf
from mistral_nemo.config import NEMO_CONTEXT, ModelConfig
from mistral_nemo.errors import CheckpointError, ConfigError

ARCHITECTURE = "llama"
# Non-weight tensors llama.cpp's converter may add; the model does not use them.
_IGNORED = ("rope_freqs.weight",)


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


class GGUFFile:
    """An opened GGUF file: metadata by key and tensors by GGUF name (memory-mapped).

    The header is parsed here rather than by `gguf.GGUFReader`, which takes ~10 s over the
    400k strings of NeMo's vocabulary and merges; the `gguf` package still does the
    dequantizing and writing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            # Copy-on-write: arrays are writable (torch wants that), the file never is.
            self.data = np.memmap(self.path, dtype=np.uint8, mode="c")
            self.fields, self.tensors = _parse(self.data)
        except (ValueError, OSError, struct.error, UnicodeDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.path}: GGUF metadata lacks {key!r}")
        return value

    def config(self) -> ModelConfig:
        arch = self.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ConfigError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(only {ARCHITECTURE!r}, which llama.cpp uses for Mistral NeMo)"
            )
        a = ARCHITECTURE
        scaling = self.get(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ConfigError(f"{self.path}: RoPE scaling {scaling!r} is not supported")
        dim = int(self.require(f"{a}.embedding_length"))
        heads = int(self.require(f"{a}.attention.head_count"))
        kv_heads = self.get(f"{a}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ConfigError(f"{self.path}: a KV head count per layer is not supported")
        tokens = self.get("tokenizer.ggml.tokens")
        embedding = self.tensors.get("token_embd.weight")
        vocab = self.get(f"{a}.vocab_size") or (
            len(tokens) if tokens else embedding is not None and embedding.shape[0]
        )
        return ModelConfig(
            dim=dim,
            n_layers=int(self.require(f"{a}.block_count")),
            n_heads=heads,
            n_kv_heads=int(kv_heads),
            head_dim=int(self.get(f"{a}.attention.key_length") or dim // heads),
            hidden_dim=int(self.require(f"{a}.feed_forward_length")),
            vocab_size=int(vocab),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10_000.0)),
            norm_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=min(int(self.get(f"{a}.context_length", NEMO_CONTEXT)), NEMO_CONTEXT),
            tie_embeddings="output.weight" not in self.tensors,
            bos_id=int(self.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=int(self.get("tokenizer.ggml.eos_token_id", 2)),
        )


@dataclass(frozen=True)
class TensorInfo:
    kind: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first, as torch has it
    data: np.ndarray  # its bytes, memory-mapped


# GGUF metadata value types: struct formats of the scalars (7 is bool, 8 string, 9 array).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


def _parse(buf: np.ndarray) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensor directory of a GGUF (version 2 or 3, little-endian) in `buf`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    mem = memoryview(buf)  # type: ignore[arg-type]
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from("<" + fmt, mem, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(mem[pos - n : pos]).decode("utf-8")

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, n = take("I"), take("Q")
            if item in _SCALARS and item != 7:
                dtype = np.dtype("<" + _SCALARS[item])
                out = np.frombuffer(mem, dtype, n, pos).tolist()
                pos += n * dtype.itemsize
                return out
            return [value(item) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata type {kind} at byte {pos}")
        return take(_SCALARS[kind])

    if bytes(mem[:4]) != b"GGUF":
        raise ValueError("no GGUF magic number")
    version = take("4xI")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    n_tensors, n_fields = take("Q"), take("Q")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("I"))
    directory = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        directory.append((name, dims, GGMLQuantizationType(take("I")), take("Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, kind, offset in directory:
        block, type_size = GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        begin = start + offset
        if begin + nbytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = TensorInfo(kind, tuple(reversed(dims)), buf[begin : begin + nbytes])
    return fields, tensors


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, dequantized to float32 (or kept as F16/BF16) on `load`."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    info: TensorInfo

    def load(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        kind, data = self.info.kind, self.info.data
        try:
            if kind == Q.BF16:
                t = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
            elif kind in (Q.F32, Q.F16):
                t = torch.from_numpy(data.view(np.float32 if kind == Q.F32 else np.float16))
            else:
                rows = data.reshape(-1, data.size // int(np.prod(self.shape[:-1])))
                t = torch.from_numpy(dequantize(rows, kind))
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name!r}: {e}") from None
        return t.reshape(self.shape)


def gguf_tensors(file: GGUFFile) -> dict[str, GGUFTensor]:
    """Tensors of the file by our name, each with the shape and dtype `load` gives."""
    from gguf import GGMLQuantizationType as Q

    dtypes = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    out = {}
    for name, t in file.tensors.items():
        ours = mistral_name_of_gguf(name)
        if ours is None:
            if name in _IGNORED:
                continue
            raise CheckpointError(f"{file.path}: unexpected tensor {name!r}")
        dtype = dtypes.get(t.kind, torch.float32)
        out[ours] = GGUFTensor(file.path, name, dtype, t.shape, t)
    return out


# -- writing -------------------------------------------------------------------------------

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def write_gguf(
    dst: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
    tensor_type: str,
    add_metadata: Callable[[Any], None],
    on_tensor: Callable[[str], None] = lambda _: None,
) -> None:
    """Write a llama-architecture GGUF from tensors in our layout, one at a time, into a
    temporary file renamed to `dst` once complete. 1-D tensors (norms) stay float32, as
    llama.cpp wants; the others take `tensor_type`. `add_metadata` adds the tokenizer keys."""
    import gguf

    if tensor_type not in GGUF_TYPES:
        raise CheckpointError(f"unknown GGUF type {tensor_type!r}; choose from {GGUF_TYPES}")
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new output path")
    kind = gguf.GGMLQuantizationType[tensor_type.upper()]
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype

    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_types[tensor_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_metadata(writer)

    plan = []
    for name, (shape, produce) in tensors.items():
        if config.tie_embeddings and name == "output.weight":
            continue
        t_kind = kind if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        if t_kind == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            t_kind = gguf.GGMLQuantizationType.F16
        block, type_size = gguf.GGML_QUANT_SIZES[t_kind]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * type_size
        writer.add_tensor_info(
            gguf_name(name), shape, np.dtype(np.float32), nbytes, raw_dtype=t_kind
        )
        plan.append((name, produce, t_kind))

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, produce, t_kind in plan:
            writer.write_tensor_data(_encode(produce(), t_kind))
            on_tensor(name)
        writer.close()
        tmp.rename(dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _encode(t: torch.Tensor, kind: Any) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    t = t.detach().cpu()
    if kind == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    if kind == Q.F16:
        return t.to(torch.float16).numpy()
    if kind == Q.F32:
        return t.to(torch.float32).numpy()
    return gguf.quants.quantize(t.to(torch.float32).numpy(), kind)
