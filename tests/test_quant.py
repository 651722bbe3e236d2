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
    grids,
    is_linear_weight,
    quantize_linear,
)
from mistral_nemo.quant.calibration import (
    calibration_batches,
    quantize_model,
    quantize_with_hessian,
)
from mistral_nemo.quant.linear import pack_int4, quantize_fp8, quantize_int4, quantize_int8


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_the_inputs_of_quantized_layers(scheme, dtype):
    """Inputs that need a gradient take the dequantized path (the kernels, torch's int8
    matmul and _scaled_mm have no backward): what QLoRA's adapters train through, bf16
    autocast included."""
    w = weight()
    layer = quantize_linear(w, scheme, group_size=64)
    x = torch.randn(3, 640, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None
    expected = layer.dequantize(0, 384).sum(0)  # d(sum(x W^T)) / dx for each row
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(x.grad.float(), expected.expand(3, -1), atol=tolerance, rtol=0.02)


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
    ref = F.linear(x.float(), layer.dequantize(0, 384))
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
    # 64 inputs, groups of 128: the layers take groups of 64
    assert main([*generate, "--quantize", "int4"]) == 0
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


def q4_1_weight(rows=64, cols=256, seed=0):
    """Weights on Q4_1's grid: q * d + m per group of 32, d and m in fp16, every group
    reaching both ends of its range (as llama.cpp's Q4_1 quantizer makes them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-8 * d + torch.randn(rows, cols // 32, 1, generator=g) * 1e-3).half().float()
    return q, d, (q * d + m).reshape(rows, cols)


def test_int4_scales_are_fp16_and_reproduce_a_q4_1_grid():
    q, d, w = q4_1_weight()
    codes, sz = quantize_int4(w, 32)
    assert sz.dtype == torch.float16 and sz.shape == (8, 64, 2)
    assert torch.equal(codes.reshape(q.shape), q.int())  # the same levels
    assert torch.equal(sz[..., 0].t().float(), d[..., 0])  # the same step, exactly
    layer = quantize_linear(w, "int4", group_size=32)
    assert layer.scales_zeros.dtype == torch.float16
    deq = layer.dequantize(0, 64)
    # only the fp16 rounding of the zero (q = 8's value) remains: far below the grid's step
    assert (deq - w).abs().max() < 0.01 * d.min()


def test_int4_search_beats_min_max_on_wide_groups():
    """With calibration, each group's grid is searched for the least error weighted by the
    inputs' mean squares: below min/max's."""
    w = weight()
    importance = torch.rand(640, generator=torch.Generator().manual_seed(5)) + 0.5
    for g in (64, 128):
        groups = w.reshape(384, -1, g)
        per_group = importance.reshape(-1, g)
        errors = []
        for scale, zero in (grids.int4_min_max(groups), grids.int4_fit(groups, per_group)):
            deq = (grids.int4_codes(groups, scale, zero) - 8) * scale + zero
            errors.append(((deq - groups).square() * per_group).sum())
        assert errors[1] < 0.95 * errors[0]


@pytest.mark.parametrize(
    ("cols", "asked", "used"), [(576, 128, 64), (96, 128, 32), (96, 64, 32), (640, 64, 64)]
)
def test_every_group_size_works_on_any_width(cols, asked, used):
    """A width the group does not divide takes the largest group size that does; the
    layer says which."""
    w = weight(rows=48, cols=cols)
    layer = quantize_linear(w, "int4", group_size=asked)
    assert layer.group_size == used and layer.scales_zeros.shape == (48, cols // used, 2)
    x = torch.randn(2, cols)
    with torch.inference_mode():
        out = layer(x[:1]), layer(x)  # the kernel, and the dequantized path
    ref = F.linear(x, w)
    for got in (out[0], out[1][:1]):
        assert ((got - ref[:1]).norm() / ref[:1].norm()) < 0.2
    with pytest.raises(ConfigError, match="multiple of 32"):
        quantize_linear(weight(rows=8, cols=100), "int4", group_size=asked)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernels_read_fp16_scales(group):
    """The C kernels against torch on scales that need fp16's mantissa (bf16 would round
    them)."""
    if not kernels.available(kernels.WeightKind.INT4):
        pytest.skip("no int4 kernel on this machine")
    g = torch.Generator().manual_seed(3)
    rows, cols = 40, 384
    q = torch.randint(0, 16, (rows, cols), generator=g)
    scales = (torch.rand(cols // group, rows, generator=g) * 0.01 + 0.001).half()
    zeros = (torch.randn(cols // group, rows, generator=g) * 0.01).half()
    assert not torch.equal(scales.bfloat16().half(), scales)
    layer = Int4Linear(pack_int4(q), torch.stack([scales, zeros], -1))
    ref = (
        (q.float() - 8).reshape(rows, -1, group) * scales.t().float()[..., None]
        + zeros.t().float()[..., None]
    ).reshape(rows, cols)
    deq = kernels.dequantize_int4(layer.weight, layer.scales_zeros, group)
    torch.testing.assert_close(deq, ref, rtol=0, atol=1e-6)
    x = torch.randn(3, cols, generator=g)
    got = kernels.gemv_int4(layer.weight, layer.scales_zeros, group, x)
    expected = x @ ref.T
    assert ((got - expected).norm() / expected.norm()) < 2e-2


def test_int4_checkpoints_with_bf16_scales_still_load(tmp_path, tiny_hf):
    """Files written before the scales were fp16 kept them in bf16."""
    quantize_checkpoint(tiny_hf, tmp_path / "q", "int4", group_size=32)
    path = tmp_path / "q" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    new = Transformer.from_pretrained(tmp_path / "q")
    old = {n: t.bfloat16() if n.endswith("scales_zeros") else t for n, t in tensors.items()}
    save_file(old, str(path), metadata=metadata)
    loaded = Transformer.from_pretrained(tmp_path / "q")
    layer = loaded.layers[0].attention.wq
    assert isinstance(layer, Int4Linear) and layer.scales_zeros.dtype == torch.float16
    tokens = torch.tensor([[1, 2000, 3000, 4000]])
    with torch.inference_mode():
        a, b = new(tokens), loaded(tokens)
    assert ((a - b).norm() / a.norm()) < 0.05  # bf16's rounding of the scales alone


@pytest.mark.parametrize("scheme", ["fp8-channel", "int8", "int4"])
def test_gptq_keeps_outputs_closer_than_rounding(scheme):
    """With correlated inputs, error feedback rounds a layer so that its outputs on those
    inputs move less than the plain quantizer's."""
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(2048, 256, generator=g) @ mix + torch.randn(256, generator=g)
    w = weight(rows=96, cols=256)
    hessian = (x.T @ x).double()
    ref = x @ w.T
    plain = quantize_linear(w, scheme, group_size=64)
    gptq = quantize_with_hessian(w, scheme, 64, hessian)
    assert type(gptq) is type(plain)
    with torch.inference_mode():
        errors = [((layer(x) - ref).norm() / ref.norm()).item() for layer in (plain, gptq)]
    assert errors[1] < 0.8 * errors[0], errors


def test_quantize_model_with_calibration(tiny_mistral, tmp_path):
    """GPTQ on calibration tokens moves the logits on other tokens less than quantizing
    on load does (given more calibration tokens than the widest layer has inputs); the
    result is written as a quantized checkpoint that loads back unchanged."""
    model = Transformer.from_pretrained(tiny_mistral)
    on_load = Transformer.from_pretrained(tiny_mistral, quantize="int4", group_size=128)
    sample = torch.randint(1000, 131072, (1, 408), generator=torch.Generator().manual_seed(1))
    tokens, calibration = sample[:, :24], sample[0, 24:].tolist()
    with torch.inference_mode():
        ref, plain = model(tokens).log_softmax(-1), on_load(tokens).log_softmax(-1)
    batches = calibration_batches(calibration, 32)
    assert len(batches) == 12 and batches[0].shape == (1, 32)
    quantize_model(model, "int4", 128, batches)
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear)
    assert model.layers[0].attention.wq.group_size == 64  # 64 inputs: the largest that fits
    assert isinstance(model.output, Int8Linear) and isinstance(on_load.output, Int8Linear)
    with torch.inference_mode():
        out = model(tokens).log_softmax(-1)
    kl = [F.kl_div(x, ref, log_target=True, reduction="batchmean") for x in (plain, out)]
    assert kl[1] < kl[0], kl
    model.save_pretrained(tmp_path / "gptq", layout="hf")
    loaded = Transformer.from_pretrained(tmp_path / "gptq")
    assert isinstance(loaded.output, Int8Linear)
    with torch.inference_mode():
        assert torch.equal(loaded(tokens).log_softmax(-1), out)
    with pytest.raises(CheckpointError, match="Hugging Face layout"):
        model.save_pretrained(tmp_path / "mistral", layout="mistral")


def test_quantize_cli_with_calibration_text(tmp_path, tiny_hf):
    text = " ".join(f"word{i} and some more text {i * 7}" for i in range(400))
    (tmp_path / "calib.txt").write_text(text)
    args = ["quantize", str(tiny_hf), str(tmp_path / "q"), "--scheme", "fp8-channel"]
    assert main([*args, "--calibration", str(tmp_path / "calib.txt")]) == 0
    loaded = Transformer.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.layers[1].feed_forward.w2, Fp8Linear)
    assert (tmp_path / "q" / "tekken.json").is_file()
    (tmp_path / "short.txt").write_text("too short")
    short = [*args[:2], str(tmp_path / "q2"), *args[3:], "--calibration"]
    assert main([*short, str(tmp_path / "short.txt")]) == 1
    assert not (tmp_path / "q2").exists()
