"""Scale-out on torch.distributed, as torchrun launches it: 2 (or 4) CPU processes over gloo
reproduce the single process. FSDP2 data parallelism, tensor (and sequence) parallelism,
the 2-D mesh of both, resharding checkpoints, tensor-parallel generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import logged_losses, train_settings, train_values

from mistral_nemo import Transformer
from mistral_nemo.cli import main
from mistral_nemo.errors import ConfigError
from mistral_nemo.train.trainer import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


def torchrun(processes: int, *args: str) -> str:
    """`torchrun --standalone --nproc-per-node N -m mistral_nemo ARGS`; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", "-m", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def launch(processes: int, config_settings: dict[str, object]) -> None:
    """The training run `config_settings` describes, in `processes` processes."""
    settings = [f"{k}={json.dumps(v)}" for k, v in config_settings.items()]
    torchrun(processes, "mistral_nemo.train", *settings)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(path).state_dict()


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    ours, theirs = weights(a), weights(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def single(tiny_hf: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, 20 steps, two micro-batches of 2 sequences a step."""
    out = tmp_path_factory.mktemp("single")
    train(train_settings(tiny_hf, out, corpus, steps=20, grad_accum=2), progress=False)
    return out


def test_fsdp_two_processes_reproduce_one(
    tiny_hf: Path, corpus: Path, tmp_path: Path, single: Path
) -> None:
    """Each of 2 FSDP2 ranks trains one of the two micro-batches: the same global batch, so
    the same losses (fp32: up to the order of the gradient sums) and the same model."""
    launch(2, train_values(tiny_hf, tmp_path, corpus, steps=20))
    torch.testing.assert_close(logged_losses(tmp_path), logged_losses(single), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "model", single / "model", atol=1e-5)


def test_fsdp_bf16_mixed_precision_stays_close(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    """Under bf16, FSDP2 gathers bf16 parameters (the residual stream goes bf16 too) where a
    single process autocasts fp32 ones: losses agree to bf16's rounding over 5 steps (bf16
    products are slow on CPUs without native bf16: the fp32 test above runs 20)."""
    reference = tmp_path / "single"
    train(train_settings(tiny_hf, reference, corpus, steps=5, grad_accum=2, precision="bf16"),
          progress=False)  # fmt: skip
    launch(2, train_values(tiny_hf, tmp_path / "fsdp", corpus, steps=5, precision="bf16"))
    torch.testing.assert_close(
        logged_losses(tmp_path / "fsdp"), logged_losses(reference), rtol=5e-3, atol=0
    )


def test_checkpoints_reshard_between_process_counts(
    tiny_hf: Path, corpus: Path, tmp_path: Path, single: Path
) -> None:
    """A checkpoint of 2 processes resumes in 1, and one of 1 in 2, continuing the run."""
    two = tmp_path / "two"
    launch(2, train_values(tiny_hf, two, corpus, steps=20, save_every=5, keep_checkpoints=4))
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints/step_000005", one / "checkpoints/step_000005")
    train(train_settings(tiny_hf, one, corpus, steps=20, grad_accum=2, save_every=15),
          progress=False)  # fmt: skip
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints/step_000015", back / "checkpoints/step_000015")
    launch(2, train_values(tiny_hf, back, corpus, steps=20))
    torch.testing.assert_close(logged_losses(one), logged_losses(single)[5:], rtol=1e-5, atol=0)
    torch.testing.assert_close(logged_losses(back), logged_losses(single)[15:], rtol=1e-5, atol=0)
    assert_same_weights(back / "model", single / "model", atol=1e-5)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_training_matches(
    tiny_hf: Path, corpus: Path, tmp_path: Path, single: Path, sequence_parallel: bool
) -> None:
    """2 tensor-parallel ranks see the same batches and split every layer. Row-parallel
    layers add their partial products in another order: a gradient near zero can change
    sign, which AdamW turns into an update of a whole step, so weights agree to 1e-4
    (a thirtieth of this run's learning rate)."""
    run = train_values(tiny_hf, tmp_path, corpus, steps=20, grad_accum=2, tp=2,
                       sequence_parallel=sequence_parallel)  # fmt: skip
    launch(2, run)
    torch.testing.assert_close(logged_losses(tmp_path), logged_losses(single), rtol=1e-5, atol=0)
    assert_same_weights(tmp_path / "model", single / "model", atol=1e-4)


def test_fsdp_and_tensor_parallel_as_a_2d_mesh(
    tiny_hf: Path, corpus: Path, tmp_path: Path, single: Path
) -> None:
    """4 processes: 2 data-parallel groups (FSDP2) of 2 tensor-parallel ranks."""
    launch(4, train_values(tiny_hf, tmp_path, corpus, steps=20, tp=2, sequence_parallel=True))
    torch.testing.assert_close(logged_losses(tmp_path), logged_losses(single), rtol=1e-5, atol=0)


def test_lora_under_fsdp_saves_the_single_process_adapter(
    tiny_hf: Path, corpus: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    reference = tmp_path / "single"
    train(train_settings(tiny_hf, reference, corpus, grad_accum=2, lora_rank=4,
                         activation_checkpointing=True), progress=False)  # fmt: skip
    launch(2, train_values(tiny_hf, tmp_path / "fsdp", corpus, lora_rank=4,
                           activation_checkpointing=True))  # fmt: skip
    ours = load_file(tmp_path / "fsdp/adapter/adapter_model.safetensors")
    theirs = load_file(reference / "adapter/adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)


def test_tensor_parallel_generation_gives_the_single_process_tokens(single: Path) -> None:
    args = ["generate", str(single / "model"), "--prompt", "The quick brown fox",
            "--max-tokens", "16", "--temperature", "0"]  # fmt: skip
    split = torchrun(2, "mistral_nemo", *args, "--tp", "2")
    whole = subprocess.run(
        [sys.executable, "-m", "mistral_nemo", *args], capture_output=True, text=True, check=True
    ).stdout
    assert split == whole and len(whole.strip()) > 0


def test_parallel_settings_are_checked(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must divide"):
        train(train_settings(tiny_hf, tmp_path, corpus, tp=2), progress=False)  # 1 process
    with pytest.raises(ConfigError, match="use tp=1"):
        train_settings(tiny_hf, tmp_path, corpus, tp=2, qat="fp8")
    with pytest.raises(ConfigError, match="device=cuda"):
        train_settings(tiny_hf, tmp_path, corpus, cpu_offload=True)
    assert main(["generate", str(tiny_hf), "--prompt", "x", "--tp", "2"]) == 1
