"""The training loop: pre-training, full fine-tuning and LoRA / QLoRA on the plain model.

One optimizer step = `grad_accum` micro-batches. The loss of a step is the sum of the
token losses over all its micro-batches divided by the number of trained tokens in all of
them, so a micro-batch holding a few assistant tokens does not weigh as much as one holding
many (averaging per micro-batch would). bf16 autocast runs the matmuls in bf16 while AdamW
updates fp32 master weights.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import cast

import torch
from torch import nn
from tqdm import tqdm

from mistral_nemo.checkpoint.reading import open_checkpoint
from mistral_nemo.checkpoint.writing import save_model
from mistral_nemo.model import Block, Transformer
from mistral_nemo.parallel import (
    World,
    full_tensor,
    fully_shard_model,
    init_world,
    tensor_parallel,
)
from mistral_nemo.tokenizer import load_tokenizer
from mistral_nemo.train.config import TrainConfig
from mistral_nemo.train.loss import head_cross_entropy
from mistral_nemo.train.metrics import MetricsLog, peak_memory_mib, plot_loss
from mistral_nemo.train.optim import build_optimizer, lr_factor
from mistral_nemo.train.packing import Batch, TrainData
from mistral_nemo.train.state import (
    TrainingState,
    load_state,
    rng_state,
    save_state,
    saved_checkpoints,
    set_rng_state,
)


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed
    output: Path  # the saved model (a checkpoint folder) or LoRA adapter
    interrupted: bool  # stopped by Ctrl-C; resumable from the last checkpoint


def load_for_training(config: TrainConfig, world: World | None = None) -> Transformer:
    """The model with fp32 master weights (or a quantized frozen base for QLoRA), LoRA
    adapters or fake quantization (QAT) added when asked, activation checkpointing per
    block; split over `world`'s processes (tensor parallel, then FSDP2)."""
    world = world or World()
    model = Transformer.from_pretrained(
        config.model,
        dtype=torch.float32,
        device=world.device(config.device),
        quantize=config.quantize,
        group_size=config.group_size,
    )
    if not config.lora_rank:
        # Loaded weights may be memory-mapped from the checkpoint's files: train copies.
        for param in model.parameters():
            param.data = param.data.clone()
        model.requires_grad_(True)
    else:
        from mistral_nemo.train.lora import LoraConfig, add_lora

        add_lora(
            model,
            LoraConfig(
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=tuple(config.lora_targets),
            ),
        )
    if config.qat and config.qat_backend == "torchao":
        from mistral_nemo.train.qat import use_float8_training

        use_float8_training(model, per_row=config.qat == "fp8-channel")
    elif config.qat:
        from mistral_nemo.train.qat import add_fake_quantization

        add_fake_quantization(model, config.qat, config.group_size, config.qat_activations)
    if world.tp > 1:
        assert world.mesh is not None
        tensor_parallel(model, world.mesh["tp"], config.sequence_parallel)
    if config.activation_checkpointing:
        # The composable API adds hooks instead of wrapping modules, so parameter names
        # (and with them checkpoints and adapters) stay those of the plain model.
        from torch.distributed._composable import checkpoint

        for module in model.modules():
            if isinstance(module, Block):
                checkpoint(module)
    if world.dp > 1:
        assert world.mesh is not None
        fully_shard_model(model, world.mesh["dp"], config.precision == "bf16", config.cpu_offload)
    model.train()
    return model


def training_data(config: TrainConfig, progress: bool = False) -> TrainData:
    """The run's batch stream, the same in every process (each takes its share)."""
    from mistral_nemo.train.data import pretraining_data
    from mistral_nemo.train.sft import sft_data

    build: Callable[..., TrainData] = sft_data
    if config.data_format == "text":
        cache = Path(config.cache_dir) if config.cache_dir else None
        build = partial(pretraining_data, cache_dir=cache)
    return build(
        config.data,
        load_tokenizer(config.model),
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        cross_document_attention=config.attends_across_documents(),
        bad_lines=config.bad_lines,
        progress=progress,
    )


def micro_batch_loss(
    model: Transformer, batch: Batch, config: TrainConfig, device: torch.device | None = None
) -> torch.Tensor:
    """The summed cross-entropy of the batch's trained tokens."""
    device = device or torch.device(config.device)
    batch = batch.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    with autocast:
        hidden = model.hidden(batch.tokens, 0, batch.attention(model.config))
        return head_cross_entropy(model.output, hidden, batch.labels, model.config.vocab_size)


class _StopRequest:
    """Ctrl-C during training asks the loop to stop after the current step (and save);
    a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write("stopping after this step (Ctrl-C again to stop at once)")

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling there
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) the training `config` describes; see `TrainConfig`. Under torchrun
    every process calls this; the main one logs and writes the results."""
    config.check()
    world = init_world(config.tp, config.device)
    out = Path(config.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.to_yaml())
    progress = progress and world.is_main
    torch.manual_seed(config.seed)
    model = load_for_training(config, world)
    with world.main_first():  # it tokenizes and caches the corpora once for all
        data = training_data(config, progress)
    optimizer = build_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]

    state = TrainingState(step=0, data={}, rng={})
    checkpoints = saved_checkpoints(out / "checkpoints")
    if checkpoints:
        state = load_state(checkpoints[-1], model, optimizer, world)
        data.load_state_dict(state.data)
        set_rng_state(state.rng)
        if progress:
            tqdm.write(f"resuming from {checkpoints[-1]} (step {state.step})")
    log = MetricsLog(out, config.tensorboard, state.step) if world.is_main else None
    batches = data.batches()
    device = world.device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def checkpoint_now() -> None:
        state.data, state.rng = data.state_dict(), rng_state()
        save_state(out / "checkpoints", model, optimizer, state, config.keep_checkpoints, world)

    stop = _StopRequest()
    bar = tqdm(
        total=config.steps, initial=state.step, desc="training", unit="step", disable=not progress
    )
    with stop.installed():
        while state.step < config.steps and not world.any(stop.requested):
            started = time.perf_counter()
            lr = config.lr * lr_factor(state.step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every process draws the global batch; each data-parallel rank trains its share.
            micro = [next(batches) for _ in range(config.grad_accum * world.dp)]
            trained = sum(b.trained_tokens for b in micro)
            total = 0.0
            for batch in micro[world.dp_rank :: world.dp]:
                loss = micro_batch_loss(model, batch, config, device) / max(trained, 1)
                # FSDP averages gradients over the data-parallel ranks; the loss is already
                # divided by the global batch's trained tokens, so they must add up.
                (loss * world.dp).backward()
                total += loss.item()
            total = world.sum(total)
            grad_norm = _clip(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            bar.update()
            bar.set_postfix(loss=f"{total:.4f}")
            if log and (state.step % config.log_every == 0 or state.step == config.steps):
                log.write(
                    {
                        "step": state.step,
                        "loss": total,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "trained_tokens": trained,
                        "tokens_per_s": trained / (time.perf_counter() - started),
                        "peak_memory_mib": peak_memory_mib(device),
                    }
                )
            if config.save_every and state.step % config.save_every == 0:
                checkpoint_now()
        interrupted = world.any(stop.requested)
        if interrupted:
            checkpoint_now()
    bar.close()
    if log:
        log.close()
        if config.plot:
            plot_loss(log.path, out / "loss.png")
    if interrupted:
        return TrainResult(state.step, out / "checkpoints", interrupted=True)
    return TrainResult(state.step, save_result(model, config, out, world), interrupted=False)


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients to a global norm of at most `max_norm` (0: leave them); return
    the norm before. Sharded gradients (DTensors) count whole: their norms are reduced."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = [full_tensor(torch.linalg.vector_norm(g, dtype=torch.float32)) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        scale = float((max_norm / (total + 1e-6)).clamp(max=1.0))
        for g in grads:
            g.mul_(scale)
    return float(total)


def save_result(
    model: Transformer, config: TrainConfig, out: Path, world: World | None = None
) -> Path:
    """The trained model as a normal checkpoint in the source's dtype (fp32 after QAT: the
    quantizer must see the weights training rounded) with its tokenizer files beside it,
    or the LoRA adapter in PEFT's format. A sharded model's trained tensors are gathered
    to the main process, which writes them."""
    world = world or World()
    tensors = None
    if world.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        tensors = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    target = out / ("adapter" if config.lora_rank else "model")
    if world.is_main:
        _write_result(model, tensors, config, target)
    world.barrier()
    return target


def _write_result(
    model: Transformer, tensors: dict[str, torch.Tensor] | None, config: TrainConfig, target: Path
) -> None:
    if config.lora_rank:
        from mistral_nemo.train.lora import save_adapter

        save_adapter(model, target, base_model=config.model, tensors=tensors)
        return
    source = open_checkpoint(config.model)
    if target.exists():  # a finished run started again: its result is rewritten
        shutil.rmtree(target)
    save_model(
        model,
        target,
        layout=config.layout,
        dtype=torch.float32 if config.qat else source.dtype,
        extra_files=source.companion_files(),
        state=tensors,
    )
