"""Reading, writing and converting both checkpoint layouts; bad files give named errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_nemo import CheckpointError, ConfigError, ModelConfig, Transformer
from mistral_nemo.checkpoint import convert_checkpoint, open_checkpoint
from mistral_nemo.checkpoint.random_init import init_random


def file_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def assert_bit_exact(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(
            a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)
        ), k


@pytest.mark.parametrize("shard_bytes", [5 * 10**9, 8 * 10**6])
def test_hf_to_mistral_to_hf_is_bit_exact(tmp_path, checkpoints, shard_bytes):
    src = checkpoints["mha", "hf"]
    convert_checkpoint(src, tmp_path / "m", "mistral")
    convert_checkpoint(tmp_path / "m", tmp_path / "h", "hf", shard_bytes=shard_bytes)
    assert_bit_exact(file_tensors(src), file_tensors(tmp_path / "h"))
    if shard_bytes < 10**9:
        index = json.loads((tmp_path / "h" / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert all((tmp_path / "h" / shard).is_file() for shard in shards)
    assert (tmp_path / "h" / "tekken.json").read_bytes() == (src / "tekken.json").read_bytes()
    assert json.loads((tmp_path / "h" / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )


def test_mistral_layout_keeps_mistral_names_and_rotary_order(tmp_path, checkpoints):
    hf, mistral = checkpoints["tiny", "hf"], checkpoints["tiny", "mistral"]
    names = file_tensors(mistral).keys()
    assert "layers.0.attention.wq.weight" in names and "output.weight" in names
    # Same seed, same weights: the HF file holds wq with the rows permuted per head.
    a, b = file_tensors(hf), file_tensors(mistral)
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], b["layers.0.attention.wq.weight"]
    )
    assert torch.equal(
        a["model.layers.0.self_attn.v_proj.weight"], b["layers.0.attention.wv.weight"]
    )


def test_save_pretrained_round_trip(tmp_path, tiny_mistral):
    model = Transformer.from_pretrained(tiny_mistral)
    for layout in ("hf", "mistral"):
        model.save_pretrained(tmp_path / layout, layout=layout)
        again = Transformer.from_pretrained(tmp_path / layout)
        for (k, v), (k2, v2) in zip(
            model.state_dict().items(), again.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2)


def test_convert_changes_dtype(tmp_path, tiny_mistral):
    convert_checkpoint(tiny_mistral, tmp_path / "bf16", "hf", dtype=torch.bfloat16)
    assert open_checkpoint(tmp_path / "bf16").dtype == torch.bfloat16
    model = Transformer.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_loading_in_file_dtype_is_zero_copy(tiny_mistral):
    model = Transformer.from_pretrained(tiny_mistral)
    weight = model.layers[0].feed_forward.w1.weight
    # A view of the memory-mapped file: its storage is not resizable, unlike allocated memory.
    assert not weight.untyped_storage().resizable()
    converted = Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
    assert converted.layers[0].feed_forward.w1.weight.untyped_storage().resizable()


def test_peak_memory_of_bf16_load_stays_near_weight_size(tmp_path):
    """Loading bf16 as bf16 maps the file; no fp32 or second copy is made (checked in a fresh
    process; benchmarks/load_memory.py shows the same on a >= 1 GB checkpoint)."""
    config = ModelConfig.preset("tiny").replace(
        dim=512, hidden_dim=1024, n_heads=8, n_kv_heads=2, head_dim=64, n_layers=4
    )
    init_random(tmp_path / "m", config, "hf", dtype=torch.bfloat16)
    script = textwrap.dedent(f"""
        import psutil, torch
        from mistral_nemo import ModelConfig, Transformer
        with torch.device("meta"):  # one-time cost of torch's meta machinery (~70 MB)
            Transformer(ModelConfig.preset("tiny"))
        before = psutil.Process().memory_info().rss
        open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
        model = Transformer.from_pretrained("{tmp_path}/m")
        for p in model.parameters():
            p.max()  # read every page of every weight
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print(int(hwm.split()[1]) * 1024 - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ratio = int(out.stdout.strip().splitlines()[-1]) / (config.num_parameters() * 2)
    assert ratio <= 1.3, ratio


# -- bad input ---------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path, tiny_hf):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_hf, dst)
    return dst


def rewrite(folder, change):
    file = folder / "model.safetensors"
    tensors = file_tensors(folder)
    change(tensors)
    file.unlink()
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(broken):
    rewrite(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'layers.1.feed_forward.w3.weight'"):
        Transformer.from_pretrained(broken)


def test_extra_tensor_is_named(broken):
    rewrite(broken, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: unexpected tensor "
        r"'model.layers.0.self_attn.q_proj.bias'",
    ):
        Transformer.from_pretrained(broken)


def test_extra_layer_is_named(broken):
    def add_layer(t):
        t["model.layers.2.input_layernorm.weight"] = torch.ones(64)

    rewrite(broken, add_layer)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers.2.attention_norm"):
        Transformer.from_pretrained(broken)


def test_misshaped_tensor_is_named(broken):
    rewrite(broken, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(
        CheckpointError,
        match=r"'norm.weight' has shape \[65\], the config "
        r"implies \[64\]",
    ):
        Transformer.from_pretrained(broken)


def test_truncated_file(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        Transformer.from_pretrained(broken)


def test_corrupt_header(broken):
    (broken / "model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Transformer.from_pretrained(broken)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="no params.json .* or config.json"):
        Transformer.from_pretrained(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(broken)


def test_missing_shard_named_by_index(tmp_path, checkpoints):
    convert_checkpoint(checkpoints["mha", "mistral"], tmp_path / "h", "hf", shard_bytes=8 * 10**6)
    second = sorted((tmp_path / "h").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"lists {second.name}, which is missing"):
        Transformer.from_pretrained(tmp_path / "h")


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Transformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint folder"):
        Transformer.from_pretrained(tmp_path / "f")


def test_existing_output_is_never_overwritten(tmp_path, tiny_mistral):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(tiny_mistral, tmp_path / "out", "hf")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_failed_write_leaves_nothing_behind(tmp_path, broken):
    model = Transformer.from_pretrained(broken)
    model.output.weight = torch.nn.Parameter(torch.zeros(3, 3))  # fails after a few tensors
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight': produced"):
        model.save_pretrained(tmp_path / "out", layout="hf")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]
