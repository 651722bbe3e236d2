"""Resumable training checkpoints: everything a run needs to continue exactly where it stopped.

One folder per step, `OUTPUT/checkpoints/step_000100/`:
- a torch.distributed.checkpoint (DCP) of the parameters being trained (all of them, or the
  LoRA adapters; a frozen base is rebuilt from the run's `model`) and of AdamW's state, by
  parameter name: each process writes its own shards, and loading reshards, so a run saved
  by 2 processes resumes in 1 and the other way round;
- `trainer.pt`: the step, the data position and every random generator's state.
Written into a temporary folder that is renamed once complete, so a crash or Ctrl-C while
saving never leaves a checkpoint that looks whole; older ones beyond `keep` are deleted.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mistral_nemo.errors import CheckpointError
from mistral_nemo.parallel import World

PREFIX = "step_"


@dataclass
class TrainingState:
    step: int  # optimizer steps completed
    data: dict[str, Any]  # the data stream's position
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns each time it runs without a process group, which one process is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _trained_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state by parameter name, the model's limited to what trains (a
    QLoRA base's quantized buffers are rebuilt from the run's `model`, not saved)."""
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in model_state.items() if n in trained}, optimizer_state


def save_state(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
    world: World | None = None,
) -> Path:
    """Every process calls this: each writes its shards, the main one the rest."""
    world = world or World()
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".{final.name}.partial"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    try:
        model_state, optimizer_state = _trained_state(model, optimizer)
        state_dict = {"model": model_state, "optimizer": optimizer_state}
        with _single_process_quietly():
            dcp.save(state_dict, checkpoint_id=tmp, no_dist=not world.distributed)
        if world.is_main:
            trainer = {"step": state.step, "data": state.data, "rng": state.rng}
            torch.save(trainer, tmp / "trainer.pt")
        world.barrier()
        if world.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    world.barrier()
    if world.is_main:
        for old in saved_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def saved_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World | None = None
) -> TrainingState:
    """Restore the trained parameters and the optimizer in place (resharded to this run's
    processes); return the rest."""
    world = world or World()
    model_state, optimizer_state = _trained_state(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_quietly():
            dcp.load(state, checkpoint_id=path, no_dist=not world.distributed)
        trainer = torch.load(path / "trainer.pt", weights_only=False)
    except (OSError, RuntimeError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a training checkpoint of this run's parameters ({message}); "
            "was it written with other settings?"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),
    )
    return TrainingState(trainer["step"], trainer["data"], trainer["rng"])
