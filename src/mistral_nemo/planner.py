"""How much memory a model needs to serve a given context and batch: weights, KV cache and
activations, computed from the config (never from remembered figures)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import InvalidRequestError

# Bytes per weight of the linear layers; embeddings, LM head and norms stay in bf16 when
# the linear layers are quantized (as in the FP8 checkpoints NeMo users run). int4 carries
# one bf16 scale and one bf16 zero point per group of 128 weights.
WEIGHT_BYTES = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + 4 / 128,
}
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(size: int | str) -> int:
    """1073741824, "1GiB", "1.5g", "512MB" -> bytes (powers of 1024)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", size.lower())
    if not m:
        raise InvalidRequestError(f"cannot read {size!r} as a memory size (e.g. 4GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def fits(self, capacity: int) -> bool:
        return self.total <= capacity


def plan_memory(
    config: ModelConfig,
    context: int,
    batch: int = 1,
    weights: str = "bf16",
    kv: str = "bf16",
    prefill_chunk: int = 2048,
) -> MemoryPlan:
    if weights not in WEIGHT_BYTES:
        raise InvalidRequestError(
            f"unknown weight format {weights!r}; choose from {', '.join(WEIGHT_BYTES)}"
        )
    if kv not in KV_BYTES:
        raise InvalidRequestError(
            f"unknown KV cache format {kv!r}; choose from {', '.join(KV_BYTES)}"
        )
    if context < 1 or batch < 1:
        raise InvalidRequestError("context and batch must be positive")
    c = config
    linear = c.n_layers * (
        c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.hidden_dim
    )
    other = c.num_parameters() - linear  # embeddings, LM head, norms
    other_bytes = other * (4 if weights == "fp32" else 2)
    weight_bytes = int(linear * WEIGHT_BYTES[weights]) + other_bytes
    kv_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * KV_BYTES[kv] * context * batch
    # Peak activations of one prefill chunk: residual stream and norms, q/k/v, the three
    # SwiGLU intermediates (bf16, fp32 for fp32 weights), plus fp32 logits of the batch.
    act = 4 if weights == "fp32" else 2
    chunk = min(context, prefill_chunk)
    per_token = 4 * c.dim + (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.hidden_dim
    activation_bytes = chunk * per_token * act + batch * c.vocab_size * 4
    return MemoryPlan(weight_bytes, kv_bytes, activation_bytes)


def format_plan(plan: MemoryPlan, capacity: int | None = None) -> str:
    gib = 2**30
    lines = [
        f"weights      {plan.weights / gib:8.2f} GiB",
        f"KV cache     {plan.kv_cache / gib:8.2f} GiB",
        f"activations  {plan.activations / gib:8.2f} GiB",
        f"total        {plan.total / gib:8.2f} GiB",
    ]
    if capacity is not None:
        margin = abs(capacity - plan.total) / gib
        if plan.fits(capacity):
            lines.append(f"fits in {capacity / gib:.1f} GiB ({margin:.2f} GiB to spare)")
        else:
            lines.append(f"does NOT fit in {capacity / gib:.1f} GiB ({margin:.2f} GiB short)")
    return "\n".join(lines)
