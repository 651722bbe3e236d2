"""A decode step of several sequences through every layer in one C call per `fp32_rows` of
them (`decode_step` in csrc/decode_step.c).

The model describes its layers once (`LayerSpec`, `LinearSpec`), the cache says where each
sequence's keys and values are (`KVLayout`), and `Decoder` runs the step in fp32: RMSNorms,
products, RoPE, cache writes, attention, SiLU and residuals. A token of SmolLM2-135M took
~40 small torch ops per layer besides its products; they cost as much as the products.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from mistral_nemo.kernels import (
    _KINDS,
    MAX_BATCH_QUANTIZED,
    WeightKind,
    _library,
    available,
    fp32_rows,
    threads,
)
from mistral_nemo.kernels.header import address, check_allocation, ffi

# Weight dtypes that come with scales.
_SCALED = (torch.uint8, torch.int8, torch.float8_e4m3fn)
# The C types of each step's arguments, looked up once (by name, a lookup costs about as
# much as the cast).
_FLOAT_POINTER, _LONG_POINTER = ffi.typeof("float *"), ffi.typeof("long *")
_KV_LAYOUTS, _LONGS = ffi.typeof("kv_layout_t[]"), ffi.typeof("long[]")


class LinearSpec(NamedTuple):
    """A linear layer as the kernels read it. The weight's dtype says its kind: fp32, bf16,
    float8_e4m3fn (`scale`: fp32, one or one per row), int8 (`scale`: fp32 per row) or
    uint8, int4 packed two a byte (`scale`: (scale, zero) fp16 [rows, groups, 2], `group`
    its group size)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    group: int = 0

    @property
    def kind(self) -> WeightKind | None:
        if self.weight.dtype == torch.uint8:
            return WeightKind.INT4
        if self.weight.dtype == torch.int8:
            return WeightKind.INT8
        return _KINDS.get(self.weight.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.weight.shape
        return rows, cols * 2 if self.kind == WeightKind.INT4 else cols


class LayerSpec(NamedTuple):
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Sequence[LinearSpec]  # q, k and v, or one layer with their rows stacked
    wo: LinearSpec
    gate_up: Sequence[LinearSpec]  # the gate and up projections, or one stacked
    w2: LinearSpec


class KVLayout(NamedTuple):
    """Where a sequence's keys and values are, for its new token at `pos`: `k` and `v` fp32
    [layers, ...], position p of KV head g at element slot(p) * slot_stride + g * head_stride
    of a layer; slot(p) is p, or with a paged cache's block table `blocks` (int64),
    blocks[p // block_size] * block_size + p % block_size. `freqs`: the complex RoPE
    rotation of each position."""

    k: torch.Tensor
    v: torch.Tensor
    slot_stride: int
    head_stride: int
    freqs: torch.Tensor
    pos: int
    blocks: torch.Tensor | None = None
    block_size: int = 1


def _usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _linear_ok(x: LinearSpec) -> bool:
    kind, (rows, cols) = x.kind, x.shape
    if kind is None or not available(kind) or not _usable(x.weight):
        return False
    if x.scale is None:
        return x.weight.dtype not in _SCALED
    if not _usable(x.scale):
        return False
    if kind == WeightKind.INT4:
        return x.group > 0 and cols % x.group == 0 and x.scale.numel() == rows * cols // x.group * 2
    return x.scale.numel() in ((rows,) if kind == WeightKind.INT8 else (1, rows))


class Decoder:
    """Every layer of one new token of each sequence, and the final norm, in one C call, for
    layers that `supports` accepts. Holds the tensors it was built from (their storage stays
    alive however the model changes; whether it is still the model's is the model's
    business)."""

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        norm: torch.Tensor,
        eps: float,
        heads: int,
        kv: int,
        head_dim: int,
    ) -> None:
        self._keep: list[torch.Tensor] = []
        self._layers = ffi.new("layer_t[]", [self._layer(spec) for spec in layers])
        dim, hidden = layers[0].w2.shape
        self._decoder = ffi.new(
            "decoder_t *",
            {
                "n_layers": len(layers), "dim": dim, "hidden": hidden, "heads": heads, "kv": kv,
                "hd": head_dim, "eps": eps, "layers": self._layers, "norm": self._pointer(norm),
            },
        )  # fmt: skip
        self._decoder_address = address(self._decoder)
        self.dim = dim
        # How many sequences one call takes while its products beat torch's; more go in
        # calls of max_batch (at par with torch's products or better, and no gathering of the
        # cache).
        fp32 = all(
            x.weight.dtype == torch.float32
            for spec in layers
            for x in (*spec.qkv, spec.wo, *spec.gate_up, spec.w2)
        )
        self.max_batch = fp32_rows(dim) if fp32 else MAX_BATCH_QUANTIZED

    @staticmethod
    def supports(
        layers: Sequence[LayerSpec], norm: torch.Tensor, heads: int, kv: int, head_dim: int
    ) -> bool:
        """Whether this machine's kernels cover every layer: fp32 norms and activations,
        weights of kinds with a vectorized kernel, everything contiguous on the CPU, and
        every shape what the C step assumes (it reads by these numbers, unchecked)."""
        if not (available(torch.float32) and norm.dtype == torch.float32 and _usable(norm)):
            return False
        dim, q_size = norm.numel(), heads * head_dim
        for spec in layers:
            if len(spec.qkv) not in (1, 3) or len(spec.gate_up) not in (1, 2):
                return False
            hidden = spec.w2.shape[1]
            shapes_ok = (
                all(x.shape[1] == dim for x in [*spec.qkv, *spec.gate_up])
                and sum(x.shape[0] for x in spec.qkv) == q_size + 2 * kv * head_dim
                and sum(x.shape[0] for x in spec.gate_up) == 2 * hidden
                and spec.wo.shape == (dim, q_size)
                and spec.w2.shape[0] == dim
                and all(t.numel() == dim for t in (spec.attention_norm, spec.ffn_norm))
            )
            norms_ok = all(
                t.dtype == torch.float32 and _usable(t)
                for t in (spec.attention_norm, spec.ffn_norm)
            )
            linears = [*spec.qkv, spec.wo, *spec.gate_up, spec.w2]
            if not (shapes_ok and norms_ok and all(_linear_ok(x) for x in linears)):
                return False
        return True

    def _pointer(self, t: torch.Tensor) -> Any:
        self._keep.append(t.detach())
        return ffi.cast("void *", t.data_ptr())

    def _linear(self, spec: LinearSpec) -> dict[str, Any]:
        """A linear_t's fields."""
        rows, cols = spec.shape
        return {
            "kind": spec.kind, "rows": rows, "cols": cols, "group": spec.group,
            "w": self._pointer(spec.weight),
            "scale": ffi.NULL if spec.scale is None else self._pointer(spec.scale),
            "scales": 0 if spec.scale is None else spec.scale.numel(),
        }  # fmt: skip

    def _layer(self, spec: LayerSpec) -> dict[str, Any]:
        """A layer_t's fields (the arrays' unused entries stay zero)."""
        return {
            "attention_norm": self._pointer(spec.attention_norm),
            "ffn_norm": self._pointer(spec.ffn_norm),
            "qkv": [self._linear(x) for x in spec.qkv],
            "wo": self._linear(spec.wo),
            "gate_up": [self._linear(x) for x in spec.gate_up],
            "w2": self._linear(spec.w2),
            "n_qkv": len(spec.qkv),
            "n_gate_up": len(spec.gate_up),
        }

    def __call__(self, x: torch.Tensor, caches: Sequence[KVLayout]) -> torch.Tensor:
        """x: the new token's embedding of each sequence ([batch, 1, dim] or [batch, dim]);
        returns the final norm's output [batch, dim] in fp32 and stores each sequence's keys
        and values at its `pos`."""
        batch, most = len(caches), self.max_batch
        if batch > most:
            parts = range(0, batch, most)
            return torch.cat([self(x[i : i + most], caches[i : i + most]) for i in parts])
        lib = _library()
        assert lib is not None
        out = x.reshape(batch, self.dim).to(torch.float32, copy=True)
        layouts = ffi.new(
            _KV_LAYOUTS,
            [
                (
                    ffi.cast(_FLOAT_POINTER, c.k.data_ptr()),
                    ffi.cast(_FLOAT_POINTER, c.v.data_ptr()),
                    c.k.stride(0),
                    c.slot_stride,
                    c.head_stride,
                    ffi.NULL if c.blocks is None else ffi.cast(_LONG_POINTER, c.blocks.data_ptr()),
                    c.block_size,
                )  # fmt: skip
                for c in caches
            ],
        )
        positions = ffi.new(_LONGS, [c.pos for c in caches])
        freqs = caches[0].freqs
        if all(c.freqs is freqs for c in caches):  # one cache's sequences: one gather
            rotations = torch.view_as_real(freqs[[c.pos for c in caches]])
        else:
            rotations = torch.stack([torch.view_as_real(c.freqs[c.pos]) for c in caches])
        failed = lib.decode_step(
            self._decoder_address, batch, address(layouts), address(positions),
            rotations.data_ptr(), out.data_ptr(), threads(),
        )  # fmt: skip
        check_allocation("decode_step", failed)
        return out
