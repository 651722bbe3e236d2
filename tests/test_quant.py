"""Quantized linear layers against their dequantized weights, and quantize-on-load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_nemo import CheckpointError, ConfigError, Transformer, kernels
from mistral_nemo.checkpoint import convert_checkpoint, quantize_checkpoint
from mistral_nemo.cli import main
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.quant import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    fuse_rows,
    is_linear_weight,
    quantize_linear,
)
from mistral_nemo.quant.linear import quantize_fp8, quantize_int4, quantize_int8


def weight(rows=384, cols=640, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[::37, ::53] *= 20  # outliers, as trained weights have
    return w


def test_fp8_quantization_error_and_range():
    w = weight()
    for per_channel in (False, True):
        q, scale = quantize_fp8(w, per_channel)
        assert q.dtype == torch.float8_e4m3fn and scale.numel() == (384 if per_channel else 1)
        deq = q.float() * (scale[:, None] if per_channel else scale)
        assert q.float().abs().max() <= 448
        assert ((deq - w).norm() / w.norm()) < 0.05


def test_int8_and_int4_quantization_error():
    w = weight()
    q, scale = quantize_int8(w)
    assert ((q.float() * scale[:, None] - w).norm() / w.norm()) < 0.02
    for g in (32, 64, 128):
        q4, sz = quantize_int4(w, g)
        assert q4.min() >= 0 and q4.max() <= 15 and sz.shape == (640 // g, 384, 2)
        groups = (q4.float().reshape(384, -1, g) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[
            ..., None
        ]
        assert ((groups.reshape(384, 640) - w).norm() / w.norm()) < 0.2


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_layers_match_their_dequantized_weights(scheme, tokens):
    w = weight()
    layer = quantize_linear(w.bfloat16(), scheme, group_size=64)
    x = torch.randn(1, tokens, 640).bfloat16()
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (1, tokens, 384) and out.dtype == torch.bfloat16
    ref = F.linear(x.float(), w)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < {"int4": 0.2, "int8": 0.03}.get(scheme, 0.08), rel
    kind = {"fp8": Fp8Linear, "fp8-channel": Fp8Linear, "int8": Int8Linear, "int4": Int4Linear}
    assert isinstance(layer, kind[scheme])


def test_fp8_single_token_kernel_equals_tiled_path():
    w = weight(rows=2048, cols=1024)
    layer = quantize_linear(w, "fp8-channel")
    x = torch.randn(1, 1024).bfloat16()
    with torch.inference_mode():
        one = layer(x)  # GEMV kernel (when available)
        # past the kernels' rows: dequantized tile by tile
        tiled = layer(x.expand(kernels.MAX_BATCH_QUANTIZED + 1, -1))[:1]
    assert torch.allclose(one.float(), tiled.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_gradients_reach_the_inputs_of_quantized_layers(scheme):
    """A few rows that need a gradient take the dequantized path (the kernels keep none):
    what adapters in front of a frozen quantized layer train through."""
    w = weight()
    layer = quantize_linear(w, scheme, group_size=64)
    x = torch.randn(3, 640, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    expected = layer._dequantize(0, 384).sum(0)  # d(sum(x W^T)) / dx for each row
    assert torch.allclose(x.grad, expected.expand(3, -1), atol=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_scaled_mm_path(per_channel, static):
    """The arithmetic of the GPU path (activations to E4M3 with a static or dynamic scale,
    weight and activation scales into torch._scaled_mm), run through torch's CPU
    _scaled_mm: CUDA adds only the device. Error: E4M3's 3-bit mantissa on activations."""
    w = weight()
    q, scale = quantize_fp8(w, per_channel)
    x = torch.randn(2, 7, 640).bfloat16()
    input_scale = x.float().abs().amax() / 448 if static else None
    layer = Fp8Linear(q, scale, input_scale)
    with torch.inference_mode():
        out = layer._scaled_mm(x)
    ref = F.linear(x.float(), layer._dequantize(0, 384))
    assert out.shape == (2, 7, 384) and out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_quantize_on_load(tiny_mistral, scheme):
    ref = Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
    model = Transformer.from_pretrained(tiny_mistral, quantize=scheme, group_size=32)
    linear = model.layers[0].feed_forward.w1
    assert not isinstance(linear, torch.nn.Linear)
    assert model.dtype == torch.float32  # activations: the file's dtype
    tokens = torch.randint(1000, 131072, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = ref(tokens).float(), model(tokens).float()
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    # Random weights are the worst case for 4 bits; benchmarks/quant_quality.py measures
    # realistic ones.
    assert kl < {"int4": 0.6, "fp8": 0.1}.get(scheme, 0.02), kl
    # The engine runs on quantized models too.
    out = LLM(model, kv_cache_memory="8MiB").generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "int8", "int4"])
def test_fused_projections_change_nothing_but_speed(tiny_mistral, scheme):
    """q, k and v (or gate and up) stacked into one layer by `fuse_rows`, as the decode step
    runs them, give the separate layers' outputs."""
    model = Transformer.from_pretrained(tiny_mistral, quantize=scheme, group_size=32)
    attention = model.layers[0].attention
    layers = [attention.wq, attention.wk, attention.wv]
    x = torch.randn(3, model.config.dim)
    with torch.inference_mode():
        separate = [torch.cat([layer(x[i : i + 1]) for layer in layers], -1) for i in range(3)]
        fused = fuse_rows(layers)
        assert fused is not None
        # The separate layers are views of the fused ones: no memory added.
        assert attention.wk.weight.untyped_storage().data_ptr() == (
            fused.weight.untyped_storage().data_ptr()
        )
        together = [fused(x[i : i + 1]) for i in range(3)]
    for a, b in zip(together, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_scheme():
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
        quantize_linear(weight(), "int3")
    with pytest.raises(ConfigError, match="group size"):
        quantize_linear(weight(), "int4", group_size=48)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel", "int8", "int4"])
@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_quantized_checkpoint_round_trip(tmp_path, checkpoints, scheme, layout):
    src = checkpoints["tiny", layout]
    quantize_checkpoint(src, tmp_path / "q", scheme, group_size=32)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    if scheme.startswith("fp8"):  # the AutoFP8 layout NeMo FP8 checkpoints use
        assert config["quantization_config"]["quant_method"] == "fp8"
        with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
            assert (
                f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
            )
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dim() == (
                2 if scheme == "fp8-channel" else 0
            )
    loaded = Transformer.from_pretrained(tmp_path / "q")
    on_load = Transformer.from_pretrained(src, quantize=scheme, group_size=32)
    tokens = torch.randint(1000, 131072, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), on_load(tokens))
    with pytest.raises(CheckpointError, match="already quantized"):
        Transformer.from_pretrained(tmp_path / "q", quantize="int8")
    with pytest.raises(CheckpointError, match="is quantized"):
        convert_checkpoint(tmp_path / "q", tmp_path / "c", "mistral")


def test_mistral_consolidated_fp8_layout(tmp_path, tiny_mistral):
    """Mistral's own FP8 files: weights in E4M3 with `qscale_weight` / `qscale_act`."""
    out = tmp_path / "fp8"
    out.mkdir()
    params = json.loads((tiny_mistral / "params.json").read_text())
    params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    (out / "params.json").write_text(json.dumps(params))
    shutil.copy(tiny_mistral / "tekken.json", out / "tekken.json")
    tensors = {}
    with safe_open(str(tiny_mistral / "consolidated.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            if is_linear_weight(name):
                q, scale = quantize_fp8(t)
                base = name.removesuffix(".weight")
                tensors[name] = q
                tensors[f"{base}.qscale_weight"] = scale.reshape(())
                tensors[f"{base}.qscale_act"] = torch.tensor(0.05)
            else:
                tensors[name] = t
    save_file(tensors, str(out / "consolidated.safetensors"))
    model = Transformer.from_pretrained(out)
    assert isinstance(model.layers[1].attention.wq, Fp8Linear)
    assert model.layers[1].attention.wq.input_scale.item() == pytest.approx(0.05)
    ref = Transformer.from_pretrained(tiny_mistral, quantize="fp8")
    tokens = torch.tensor([[1, 2000, 3000, 4000]])
    with torch.inference_mode():
        assert torch.equal(model(tokens), ref(tokens))


def test_quantize_cli(tmp_path, tiny_hf, capsys):
    assert main(["quantize", str(tiny_hf), str(tmp_path / "q8"), "--scheme", "int8"]) == 0
    assert main(["generate", str(tmp_path / "q8"), "--prompt", "Hi", "--max-tokens", "3"]) == 0
    generate = ["generate", str(tiny_hf), "--prompt", "Hi", "--max-tokens", "3"]
    assert main([*generate, "--quantize", "int4", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main([*generate, "--quantize", "int4"]) == 1  # 64 inputs, groups of 128
    assert "multiple of the group size (128)" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                str(tiny_hf),
                str(tmp_path / "bad"),
                "--scheme",
                "int4",
                "--group-size",
                "48",
            ]
        )
        == 1
    )
    assert "group size" in capsys.readouterr().err
