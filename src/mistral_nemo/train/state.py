"""Resumable training checkpoints: everything a run needs to continue exactly where it stopped.

One folder per step, `OUTPUT/checkpoints/step_000100/`:
- `trainable.safetensors`: the parameters being trained (all of them, or the LoRA adapters;
  a frozen base is rebuilt from the run's `model`),
- `optimizer.pt`: AdamW's moments and step counts,
- `trainer.pt`: the step, the data position and every random generator's state.
Written into a temporary folder that is renamed once complete, so a crash or Ctrl-C while
saving never leaves a checkpoint that looks whole; older ones beyond `keep` are deleted.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mistral_nemo.errors import CheckpointError

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


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {n: p.detach().contiguous() for n, p in trainable_parameters(model).items()}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": state.step, "data": state.data, "rng": state.rng}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in saved_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def saved_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def load_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore the trained parameters and the optimizer in place; return the rest."""
    try:
        weights = load_file(path / "trainable.safetensors")
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable training checkpoint ({e})") from None
    params = trainable_parameters(model)
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:3]
        extra = sorted(set(weights) - set(params))[:3]
        raise CheckpointError(
            f"{path}: its trained parameters do not match this run's "
            f"(missing {missing}, unexpected {extra}); was it written with other settings?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(optimizer_state)
    return TrainingState(trainer["step"], trainer["data"], trainer["rng"])
