"""Quantization-aware training: the trained model, quantized by `mistral-nemo quantize`,
computes exactly the logits it had in training; gradients pass the rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import logged_losses, train_settings

from mistral_nemo import Transformer
from mistral_nemo.cli import main
from mistral_nemo.errors import ConfigError
from mistral_nemo.quant import Fp8Linear, Int4Linear, Int8Linear
from mistral_nemo.train.qat import FakeQuantLinear, add_fake_quantization, fp8_activations
from mistral_nemo.train.trainer import train

# More rows than the CPU's quantized kernels take (they round activations, to bf16 for FP8
# and to int8 for int4): the quantized layers multiply by their dequantized weights.
TOKENS = torch.arange(1, 40 * 997, 997).view(1, 40)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "int4"])
def test_quantized_qat_model_gives_the_training_logits(
    tiny_hf: Path, corpus: Path, tmp_path: Path, scheme: str
) -> None:
    config = train_settings(tiny_hf, tmp_path / "run", corpus, steps=3, qat=scheme, group_size=32)
    result = train(config, progress=False)
    trained = Transformer.from_pretrained(result.output)
    assert trained.dtype == torch.float32  # saved in fp32: the weights training rounded
    add_fake_quantization(trained, scheme, group_size=32)
    assert main(["quantize", str(result.output), str(tmp_path / "q"), "--scheme", scheme,
                 "--group-size", "32"]) == 0  # fmt: skip
    quantized = Transformer.from_pretrained(tmp_path / "q", dtype=torch.float32)
    kinds = {type(m) for m in quantized.modules()}
    assert (Int4Linear if scheme == "int4" else Fp8Linear) in kinds
    if scheme == "int4":
        assert isinstance(quantized.output, Int8Linear)  # as the quantizer keeps the head
    with torch.no_grad():
        assert torch.equal(quantized(TOKENS), trained(TOKENS))


def test_int4_qat_learns_through_the_rounding(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    """Straight-through gradients reach the fp32 master weights through int4 rounding: the
    loss of the rounded model falls."""
    config = train_settings(tiny_hf, tmp_path, corpus, steps=8, qat="int4", group_size=32)
    train(config, progress=False)
    losses = logged_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5


def test_fake_quantized_layer_passes_gradients_straight_through() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False)
    model = torch.nn.Module()
    model.layer = FakeQuantLinear(base, "fp8", 128, activations=True)
    x = torch.randn(4, 64, requires_grad=True)
    out = model.layer(x)
    expected = torch.nn.functional.linear(
        fp8_activations(x.detach()), Fp8Linear(*_fp8(base.weight)).dequantize(0, 32)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    # d/dW of sum(x_q W_q^T) with W_q, x_q passed through: the sum of x_q's rows per input.
    torch.testing.assert_close(base.weight.grad, fp8_activations(x.detach()).sum(0).expand(32, 64))
    assert model.layer.weight is base.weight  # the same parameter: names and optimizer unchanged


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from mistral_nemo.quant import quantize_fp8

    return quantize_fp8(w.detach())


def test_qat_settings_are_checked(tiny_hf: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unset lora_rank"):
        train_settings(tiny_hf, tmp_path, corpus, qat="fp8", lora_rank=4)
    with pytest.raises(ConfigError, match="set qat=fp8"):
        train_settings(tiny_hf, tmp_path, corpus, qat="int4", qat_activations=True)
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        train_settings(tiny_hf, tmp_path, corpus, qat="int3")


def test_tied_head_is_left_in_full_precision(tmp_path: Path) -> None:
    import dataclasses

    from mistral_nemo import ModelConfig

    config = dataclasses.replace(ModelConfig.preset("tiny"), tie_embeddings=True)
    model = add_fake_quantization(Transformer(config), "int4")
    assert type(model.output) is torch.nn.Linear
    assert model.output.weight is model.tok_embeddings.weight
    assert isinstance(model.layers[0].attention.wq, FakeQuantLinear)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_torchao_float8_training_learns_and_saves_a_normal_checkpoint(
    tiny_hf: Path, corpus: Path, tmp_path: Path, scheme: str
) -> None:
    """torchao's float8 training (FP8 matmuls in forward and backward; CPU runs them too):
    the loss falls, the parameters keep their names, and the result quantizes as usual."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from mistral_nemo.train.trainer import load_for_training

    config = train_settings(tiny_hf, tmp_path, corpus, steps=8, qat=scheme, qat_backend="torchao",
                            precision="bf16")  # fmt: skip
    model = load_for_training(config)
    assert isinstance(model.layers[0].feed_forward.w1, Float8Linear)
    assert type(model.output) is torch.nn.Linear
    plain = Transformer.from_pretrained(tiny_hf)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    result = train(config, progress=False)
    losses = logged_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5
    assert main(["quantize", str(result.output), str(tmp_path / "q"), "--scheme", scheme]) == 0
    with pytest.raises(ConfigError, match="set qat=fp8"):
        train_settings(tiny_hf, tmp_path, corpus, qat="int4", qat_backend="torchao")
