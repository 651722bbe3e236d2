"""How much memory a model needs to serve a given context and batch: weights, KV cache and
activations, computed from the config (never from remembered figures)."""

from __future__ import annotations

import dataclasses
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


def format_plan(plan: MemoryPlan | TrainingPlan, capacity: int | None = None) -> str:
    """One line a part of `plan` and its total in GiB; whether it fits in `capacity`."""
    gib = 2**30
    lines = [
        f"{_LABELS.get(f.name, f.name):<12} {getattr(plan, f.name) / gib:8.2f} GiB"
        for f in dataclasses.fields(plan)
    ]
    per_process = " per process" if isinstance(plan, TrainingPlan) else ""
    lines.append(f"{'total':<12} {plan.total / gib:8.2f} GiB{per_process}")
    if capacity is not None:
        lines.append(_fit_line(plan.total, capacity))
    return "\n".join(lines)


_LABELS = {"kv_cache": "KV cache"}


def _fit_line(total: int, capacity: int) -> str:
    gib = 2**30
    margin = abs(capacity - total) / gib
    if total <= capacity:
        return f"fits in {capacity / gib:.1f} GiB ({margin:.2f} GiB to spare)"
    return f"does NOT fit in {capacity / gib:.1f} GiB ({margin:.2f} GiB short)"


@dataclass(frozen=True)
class TrainingPlan:
    """Bytes per process of a training run (bf16 autocast over fp32 master weights, AdamW)."""

    weights: int  # this rank's shard of the master weights (or of a frozen LoRA base)
    gradients: int
    optimizer: int  # AdamW's two moments
    # Parameters in the compute dtype: under FSDP2 the blocks it gathers whole, otherwise
    # autocast's bf16 copies, which backward keeps.
    working: int
    activations: int  # what one micro-batch keeps for backward, and the loss's chunk

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.working + self.activations

    def fits(self, capacity: int) -> bool:
        return self.total <= capacity


def plan_training(
    config: ModelConfig,
    seq_len: int,
    micro_batch: int = 1,
    dp: int = 1,
    tp: int = 1,
    lora_rank: int = 0,
    base: str = "fp32",
    activation_checkpointing: bool = False,
    sequence_parallel: bool = False,
    precision: str = "bf16",
) -> TrainingPlan:
    """Memory per process when training `config` on `dp` x `tp` processes (FSDP2 over dp,
    tensor parallel over tp) with micro-batches of `micro_batch` x `seq_len` tokens, as
    train/trainer.py runs it. Full fine-tuning keeps fp32 weights, gradients and two AdamW
    moments: 16 bytes a parameter, split over all dp x tp ranks. LoRA adapts all seven
    projections at `lora_rank` over a frozen base in `base`: fp32 (sharded like the rest),
    or quantized for QLoRA (fp8, int8, int4: buffers, which FSDP does not shard)."""
    if seq_len < 1 or micro_batch < 1 or dp < 1 or tp < 1:
        raise InvalidRequestError("seq_len, micro_batch, dp and tp must be positive")
    if base not in WEIGHT_BYTES:
        known = ", ".join(WEIGHT_BYTES)
        raise InvalidRequestError(f"unknown base format {base!r}; choose from {known}")
    c, shards = config, dp * tp
    act = 2 if precision == "bf16" else 4  # bytes of an activation
    q, kv, d, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.hidden_dim
    params = c.num_parameters()
    block = d * (2 * q + 2 * kv) + 3 * d * f
    if lora_rank:
        # A [rank, in] and B [out, rank] beside wq, wk, wv, wo, w1, w2, w3.
        trained = c.n_layers * lora_rank * (7 * d + 2 * q + 2 * kv + 3 * f)
        frozen = plan_memory(c, 1, weights=base).weights
        weights = frozen // (shards if base == "fp32" else tp) + 4 * trained // shards
    else:
        trained = params
        weights = 4 * params // shards
    if dp > 1:
        # Two blocks whole in the compute dtype (the one computed and the next, prefetched)
        # and one block's fp32 gradients before their reduce-scatter; the embeddings and
        # head stay gathered from forward to backward.
        root = params - c.n_layers * (block + 2 * d)
        working = (2 * block * act + (0 if lora_rank else 4 * block) + root * act) // tp
    elif act == 2 and base == "fp32":
        working = 2 * params // tp  # every fp32 weight's bf16 copy, kept for backward
    else:
        working = 0  # fp32 compute, or a quantized base dequantized tile by tile
    # Saved for backward per token and layer under autocast. Whole on every tensor-parallel
    # rank unless sequence parallel: the fp32 residual and both norms' fp32 inputs and
    # outputs, their outputs in `act` bytes. Split by heads and FFN width: q, k, v and the
    # attention output (twice: SDPA's and wo's input), RoPE's fp32 copies of q and k, the
    # three SwiGLU intermediates and the down projection's input.
    residual = 16 * d + 2 * act * d
    split = act * (q + 2 * kv) + 4 * (q + kv) + 2 * act * q + 4 * act * f
    per_token = residual // (tp if sequence_parallel else 1) + split // tp
    tokens = micro_batch * seq_len
    if activation_checkpointing:  # each block's fp32 input kept, one block recomputed
        saved = tokens * (c.n_layers * 4 * d // (tp if sequence_parallel else 1) + per_token)
    else:
        saved = tokens * c.n_layers * per_token
    from mistral_nemo.train.loss import BYTES_PER_LOGIT, chunk_rows

    logits = min(tokens, chunk_rows(c.vocab_size, d, head_trains=not lora_rank)) * c.vocab_size
    activations = saved + logits * BYTES_PER_LOGIT + tokens * d * 4  # + hidden's gradient
    return TrainingPlan(weights, 4 * trained // shards, 8 * trained // shards, working, activations)
