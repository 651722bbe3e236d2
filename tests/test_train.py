"""The training loop: settings, schedule, loss normalisation, exact resume, saved results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import logged_losses
from conftest import train_settings as settings
from safetensors.torch import load_file

from mistral_nemo import Transformer
from mistral_nemo.cli import main
from mistral_nemo.errors import ConfigError
from mistral_nemo.train.config import TrainConfig, load_config
from mistral_nemo.train.optim import build_optimizer, lr_factor
from mistral_nemo.train.packing import IGNORE
from mistral_nemo.train.trainer import load_for_training, micro_batch_loss, train, training_data


def test_config_from_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: m\noutput_dir: o\ndata: [a.txt]\nlr: 1e-4\nbetas: [0.9, 0.99]\n")
    config = load_config(path, ["steps=50", "lr=2e-4", "quantize=null", "lora_targets=wq"])
    assert (config.steps, config.lr, config.betas) == (50, 2e-4, (0.9, 0.99))
    assert config.lora_targets == ["wq"] and config.quantize is None
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(path, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(path, ["steps=many"])
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config(path, ["precision=fp8"])
    with pytest.raises(ConfigError, match="set lora_rank"):
        load_config(path, ["quantize=int4"])


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(110, config) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_embeddings(tiny_hf: Path, tmp_path: Path) -> None:
    config = TrainConfig(model=str(tiny_hf), weight_decay=0.1)
    model = load_for_training(config)
    optimizer = build_optimizer(model, config)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[i] and "tok_embeddings" not in names[i] for i in decayed)
    assert id(model.layers[0].attention.wq.weight) in decayed
    assert id(model.output.weight) in decayed  # untied head: a matrix like the others


def test_loss_is_normalised_over_the_whole_accumulated_batch(
    tiny_hf: Path, corpus: Path, tmp_path: Path
) -> None:
    """Two micro-batches of one sequence accumulate to the gradient of one batch of two."""
    grads = []
    for batch_size, accum in ((2, 1), (1, 2)):
        config = settings(tiny_hf, tmp_path / f"{batch_size}", corpus, batch_size=batch_size)
        model = load_for_training(config)
        batches = training_data(config).batches()
        micro = [next(batches) for _ in range(accum)]
        trained = sum(b.trained_tokens for b in micro)
        for batch in micro:
            (micro_batch_loss(model, batch, config) / trained).backward()
        grads.append(model.layers[0].attention.wq.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_head_loss_equals_the_plain_loss(
    tiny_hf: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora: bool
) -> None:
    """The loss taken a few rows at a time, with its gradients, is cross_entropy's on the
    full logits: through the head, the blocks and (full fine-tuning) the head itself."""
    import torch.nn.functional as F

    from mistral_nemo.train import loss as chunked

    config = settings(tiny_hf, tmp_path, corpus, lora_rank=4 if lora else 0, batch_size=4)
    model = load_for_training(config)
    batch = next(training_data(config).batches())
    batch.labels[0, :10] = IGNORE  # untrained positions, a whole chunk of them for LoRA
    # Chunks of 5 rows with a frozen head, of 20 (4x, below the width of 64) with a trained one.
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 5 * model.config.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = micro_batch_loss(model, batch, config)
    grads = torch.autograd.grad(loss * 0.5, trainable)
    logits = model(batch.tokens).float().flatten(0, 1)
    plain = F.cross_entropy(logits, batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    expected = torch.autograd.grad(plain * 0.5, trainable)
    torch.testing.assert_close(loss, plain)
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-4)  # fp32 sum order


def test_activation_checkpointing_keeps_gradients(
    tiny_hf: Path, corpus: Path, tmp_path: Path
) -> None:
    grads, names = [], []
    for checkpointing in (False, True):
        config = settings(tiny_hf, tmp_path, corpus, activation_checkpointing=checkpointing)
        model = load_for_training(config)
        batch = next(training_data(config).batches())
        micro_batch_loss(model, batch, config).backward()
        names.append([n for n, _ in model.named_parameters()])  # no wrapper prefixes
        grads.append(model.layers[1].feed_forward.w2.weight.grad.clone())
    assert names[0] == names[1]
    torch.testing.assert_close(grads[0], grads[1])


def test_resume_continues_the_run_bit_for_bit(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    whole = settings(tiny_hf, tmp_path / "whole", corpus, save_every=3, keep_checkpoints=5)
    train(whole, progress=False)
    # A second run that only has what the first had written by step 3.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "whole/checkpoints/step_000003", resumed_dir / "checkpoints/step_000003"
    )
    log = (tmp_path / "whole/log.jsonl").read_text().splitlines()
    (resumed_dir / "log.jsonl").write_text("\n".join(log[:5]) + "\n")  # and one line past it
    resumed = settings(tiny_hf, resumed_dir, corpus, save_every=3, keep_checkpoints=5)
    result = train(resumed, progress=False)
    assert result.steps == 6 and not result.interrupted

    assert logged_losses(resumed_dir) == logged_losses(tmp_path / "whole")
    assert len(logged_losses(resumed_dir)) == 6
    whole_model = load_file(tmp_path / "whole/model/model.safetensors")
    resumed_model = load_file(resumed_dir / "model/model.safetensors")
    assert whole_model.keys() == resumed_model.keys()
    assert all(torch.equal(whole_model[name], resumed_model[name]) for name in whole_model)


def test_ctrl_c_saves_a_checkpoint_and_stops(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    config = settings(tiny_hf, tmp_path, corpus, steps=10_000)

    def interrupt_once_training() -> None:
        while not (tmp_path / "log.jsonl").exists():  # the first step is logged
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where started in the background
    thread = threading.Thread(target=interrupt_once_training)
    thread.start()
    result = train(config, progress=False)
    thread.join()
    assert result.interrupted and 0 < result.steps < 10_000
    assert (tmp_path / f"checkpoints/step_{result.steps:06d}/trainer.pt").is_file()
    assert signal.getsignal(signal.SIGINT) == handler


def test_trained_model_is_a_normal_checkpoint_transformers_loads(
    tiny_hf: Path, corpus: Path, tmp_path: Path
) -> None:
    """bf16 autocast over fp32 weights learns the corpus; the result loads in transformers
    with the tokenizer beside it, and gives our logits."""
    transformers = pytest.importorskip("transformers")
    config = settings(tiny_hf, tmp_path, corpus, steps=12, precision="bf16", log_every=1)
    result = train(config, progress=False)
    losses = logged_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0
    assert (result.output / "tekken.json").is_file() and (result.output / "config.json").is_file()
    ours = Transformer.from_pretrained(result.output, dtype=torch.float32)
    theirs = transformers.MistralForCausalLM.from_pretrained(result.output).eval()
    tokens = torch.tensor([[1, 1000, 2000, 3000, 4000, 5000]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(
        ours.layers[0].attention.wq.weight,
        Transformer.from_pretrained(tiny_hf).layers[0].attention.wq.weight,
    )


def test_cli_trains_from_yaml_with_overrides(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {tiny_hf}\noutput_dir: {tmp_path / 'out'}\ndata: [{corpus}]\n"
        f"seq_len: 32\nprecision: fp32\nwarmup_steps: 1\ncache_dir: {tmp_path / 'cache'}\n"
    )
    assert main(["train", str(path), "steps=2", "batch_size=1", "--plot"]) == 0
    assert (tmp_path / "out/loss.png").stat().st_size > 0
    log = (tmp_path / "out/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    assert set(json.loads(log[0])) >= {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mib"}
    assert main(["train", str(path), "steps=oops"]) == 1


def test_qlora_sft_on_conversations(tiny_hf: Path, tmp_path: Path) -> None:
    """LoRA adapters on an int8 base under bf16 autocast, trained on chat data with the
    documents of a packed row kept apart; the saved adapter merges into the base."""
    from mistral_nemo.train.lora import load_merged

    chats = tmp_path / "chats.jsonl"
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(12)
    ]
    chats.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = settings(
        tiny_hf,
        tmp_path / "run",
        chats,
        data_format="chat",
        seq_len=64,
        steps=3,
        lora_rank=4,
        quantize="int8",
        precision="bf16",
        cross_document_attention=False,
    )
    result = train(config, progress=False)
    assert (result.output / "adapter_config.json").is_file()
    merged = load_merged(tiny_hf, result.output, dtype=torch.float32)
    assert not torch.equal(
        merged.layers[0].attention.wq.weight,
        Transformer.from_pretrained(tiny_hf).layers[0].attention.wq.weight,
    )


def test_show_masking_prints_the_trained_tokens(
    tiny_hf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chats = tmp_path / "chats.jsonl"
    conversation = {
        "messages": [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "General Kenobi"},
        ]
    }
    chats.write_text(json.dumps(conversation) + "\n")
    assert main(["train", "--show-masking", str(chats), f"model={tiny_hf}"]) == 0
    out = capsys.readouterr().out
    assert "[[General Kenobi</s>]]" in out and "[[Hello" not in out


def test_tied_embeddings_stay_one_parameter(tmp_path: Path, corpus: Path) -> None:
    """A model whose head is its embedding table trains one matrix, saved once."""
    from mistral_nemo import ModelConfig
    from mistral_nemo.checkpoint.random_init import init_random

    tied = ModelConfig.preset("tiny").replace(tie_embeddings=True)
    init_random(tmp_path / "tied", tied, "hf", dtype=torch.float32)
    config = settings(tmp_path / "tied", tmp_path / "run", corpus, steps=2)
    model = load_for_training(config)
    assert model.output.weight is model.tok_embeddings.weight
    result = train(config, progress=False)
    trained = Transformer.from_pretrained(result.output)
    original = Transformer.from_pretrained(tmp_path / "tied")
    assert not torch.equal(trained.tok_embeddings.weight, original.tok_embeddings.weight)
    assert trained.output.weight is trained.tok_embeddings.weight
