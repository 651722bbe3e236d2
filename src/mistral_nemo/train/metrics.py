"""Where a run's numbers go: `log.jsonl` (one line per logged step, appended, so a resumed
run continues the same file), optionally TensorBoard, and the loss-curve PNG."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from mistral_nemo.errors import ConfigError


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


class MetricsLog:
    def __init__(self, output_dir: Path, tensorboard: bool, resume_step: int) -> None:
        self.path = output_dir / "log.jsonl"
        if self.path.exists():
            # A resumed run drops what was logged after the checkpoint it resumes from.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard=true needs `pip install tensorboard`") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss(log_path: Path, png: Path) -> None:
    """The loss curve (and learning rate) of a run, from its log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'mistral-nemo[eval]'") from None
    records = read_log(log_path)
    steps = [r["step"] for r in records]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss (nats per trained token)")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
