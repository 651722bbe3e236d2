"""Scale-out on torch.distributed: a (data, tensor) device mesh, tensor parallelism with
DTensor and FSDP2 sharding. The model stays the plain `Transformer`: these functions
rewrite its parameters in place, as gpt-fast and torchtitan do.

Processes come from torchrun (its environment names the rank and the world), so the same
code runs as 2 CPU processes over gloo here and on N GPUs over NCCL:

    torchrun --nproc-per-node 8 -m mistral_nemo.train run.yaml tp=2   # 4-way FSDP x 2-way TP

Tensor parallelism (Megatron's split): q/k/v and the gate/up projections are split by
output (each rank holds whole heads, n_heads / tp of them), o and down by input, so each
block needs one all-reduce after attention and one after the feed-forward. The embedding
table is split by vocabulary rows and the LM head by vocabulary columns. With
`sequence_parallel`, the norms and the residual stream are split along the sequence
instead of repeated on every rank, the all-reduces becoming reduce-scatter + all-gather
(the same bytes): it divides the activation memory outside the matmuls by tp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import ConfigError

if TYPE_CHECKING:
    from mistral_nemo.model import KVCache, Transformer
    from mistral_nemo.runtime import ModelRunner


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size` processes, arranged as dp x tp."""

    rank: int = 0
    size: int = 1
    tp: int = 1
    mesh: DeviceMesh | None = None  # ("dp", "tp"), None for one process

    @property
    def dp(self) -> int:
        return self.size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, name: str) -> torch.device:
        """`name` ("cpu", "cuda") as this process's device: its own GPU under torchrun."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block before the others (it fills caches they read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, value: float) -> float:
        """`value` summed over the data-parallel ranks (tensor-parallel ones agree)."""
        if self.dp == 1:
            return value
        assert self.mesh is not None
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.mesh.get_group("dp"))
        return float(total)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (all stop at the same step)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value)
        return bool(value)


def init_world(tp: int = 1, device: str = "cpu") -> World:
    """The process group and mesh of a torchrun launch (NCCL for GPUs, gloo otherwise), or a
    single process without one. `tp` ranks of each data-parallel group split the layers."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or size % tp:
        raise ConfigError(f"tp={tp} must divide the {size} process(es) (torchrun --nproc-per-node)")
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    world = World(rank=dist.get_rank(), size=size, tp=tp)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(world.device(device))
    mesh = init_device_mesh(
        torch.device(device).type, (size // tp, tp), mesh_dim_names=("dp", "tp")
    )
    return dataclasses.replace(world, mesh=mesh)


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Heads, feed-forward width and vocabulary must split evenly over `tp` ranks."""
    sizes = {
        "query heads": config.n_heads,
        "KV heads": config.n_kv_heads,
        "feed-forward width": config.hidden_dim,
        "vocabulary": config.vocab_size,
    }
    for what, size in sizes.items():
        if size % tp:
            raise ConfigError(f"tp={tp} does not divide the model's {size} {what}")


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Split `model`'s layers over the ranks of `mesh` (a 1-D "tp" mesh), in place."""
    config: ModelConfig = model.config  # type: ignore[assignment]
    check_tensor_parallel(config, mesh.size())
    block_plan: dict[str, object] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    residual: Placement = Replicate()
    root_plan: dict[str, object] = {}
    if sequence_parallel:
        residual = Shard(1)

        def gathered(arguments: int) -> PrepareModuleInput:
            """The sequence-split residual gathered whole for a module's first argument."""
            rest = (None,) * (arguments - 1)
            return PrepareModuleInput(
                input_layouts=(Shard(1), *rest),
                desired_input_layouts=(Replicate(), *rest),
                use_local_output=True,
            )

        block_plan |= {
            "attention_norm": SequenceParallel(),
            "ffn_norm": SequenceParallel(),
            "attention": gathered(5),  # (x, rotations, position, cache, layer)
            "feed_forward": gathered(1),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        # The final norm runs on the whole sequence: the loss and sampling read its rows.
        root_plan["norm"] = gathered(1)
    for block in model.layers:  # type: ignore[union-attr]
        parallelize_module(block, mesh, block_plan)  # type: ignore[arg-type]
    root_plan |= {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    parallelize_module(model, mesh, root_plan)  # type: ignore[arg-type]
    if config.tie_embeddings:  # both split by vocabulary rows: one parameter again
        model.output.weight = model.tok_embeddings.weight  # type: ignore[union-attr]


def fully_shard_model(
    model: nn.Module, mesh: DeviceMesh, bf16: bool = True, cpu_offload: bool = False
) -> None:
    """FSDP2 over `mesh` (the "dp" mesh), in place: each block's parameters (and the rest, at
    the root) sharded over the ranks and gathered for its forward and backward only. With
    `bf16` they are gathered in bf16 (half the traffic) while gradients are reduced in fp32;
    `cpu_offload` keeps the shards and their optimizer state in host memory (GPU training)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    register_fsdp_forward_method(model, "hidden")  # the loss takes hidden states, not logits


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The shapes one tensor-parallel rank computes with: its share of the heads (for the
    KV cache of tensor-parallel generation)."""
    return dataclasses.replace(
        config, n_heads=config.n_heads // tp, n_kv_heads=config.n_kv_heads // tp
    )


def split_for_generation(
    model: Transformer, world: World, max_len: int
) -> tuple[ModelRunner, KVCache]:
    """`model` split over the world's tensor-parallel ranks, with the runner and the KV cache
    (of this rank's heads, for `max_len` positions) that `generate` then takes. Every rank
    computes the same logits (the head's outputs are gathered), so all sample alike."""
    from mistral_nemo.model import KVCache
    from mistral_nemo.runtime import ModelRunner

    if world.dp != 1 or world.mesh is None:
        raise ConfigError(f"--tp {world.tp} needs exactly {world.tp} processes (torchrun)")
    if any(not isinstance(m, nn.Linear) for m in _linear_layers(model)):
        raise ConfigError("tensor parallelism splits full-precision layers: drop --quantize")
    tensor_parallel(model, world.mesh["tp"])
    cache = KVCache(local_config(model.config, world.tp), 1, max_len, model.dtype, model.device)
    return ModelRunner(model, kernels=False), cache


def _linear_layers(model: Transformer) -> list[nn.Module]:
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
    return [m for n, m in model.named_modules() if n.rpartition(".")[2] in names]


def shared_seed(world: World, seed: int | None) -> int | None:
    """`seed`, or one drawn by the main process for all when None: ranks that sample with
    different generators would pick different tokens."""
    if seed is not None or not world.distributed:
        return seed
    value = torch.randint(0, 2**62, (1,)) if world.is_main else torch.zeros(1, dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t
