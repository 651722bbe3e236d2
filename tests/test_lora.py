"""LoRA and QLoRA: only adapters train, quantized bases stay bit-identical, adapters are
PEFT's files (peft + transformers give our logits, and we give theirs), merging is exact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

from mistral_nemo import Transformer
from mistral_nemo.cli import _load_llm, build_parser, main
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.errors import CheckpointError, ConfigError
from mistral_nemo.quant import Int8Linear
from mistral_nemo.train.lora import (
    LINEAR_NAMES,
    LoraConfig,
    adapter_state_dict,
    add_lora,
    load_adapter,
    load_merged,
    lora_layers,
    merge_lora,
    save_adapter,
)
from mistral_nemo.train.peft_format import CONFIG_FILE, WEIGHTS_FILE

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
SMALL = LoraConfig(rank=4, alpha=8.0)


def tokens(seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(
        1000, TINY.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def randomize(model: Transformer, seed: int) -> Transformer:
    """Adapters as if trained: B is zero when added, which would hide any mistake in it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_a.normal_(0, 0.1, generator=g)
            layer.lora_b.normal_(0, 0.1, generator=g)
    return model


def adapted(path, config: LoraConfig = SMALL, **load) -> Transformer:
    return randomize(add_lora(Transformer.from_pretrained(path, **load), config), seed=1)


@pytest.fixture(scope="module")
def adapter(tiny_hf, tmp_path_factory):
    """An adapter of every linear layer of the tiny model, random A and B, saved by us."""
    path = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(adapted(tiny_hf), path, base_model=tiny_hf)
    return path


@pytest.fixture(scope="module")
def merged(tiny_hf, adapter, tmp_path_factory):
    """The tiny checkpoint with `adapter` merged in by the merge command (the base's layout)."""
    path = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", str(tiny_hf), str(adapter), str(path)]) == 0
    return path


def test_only_adapters_train_and_a_new_adapter_changes_nothing(tiny_hf):
    base = Transformer.from_pretrained(tiny_hf)
    model = add_lora(Transformer.from_pretrained(tiny_hf), LoraConfig(rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(LINEAR_NAMES) * TINY.n_layers
    assert all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert set(lora_layers(model)) == {
        f"layers.{i}.{part}.{name}"
        for i in range(TINY.n_layers)
        for part, names in (("attention", "wq wk wv wo"), ("feed_forward", "w1 w2 w3"))
        for name in names.split()
    }
    with torch.no_grad():
        assert torch.equal(model(tokens(0)), base(tokens(0)))  # B starts at zero


@pytest.mark.parametrize("quantize", [None, "int4", "int8", "fp8"])
def test_steps_change_adapters_only_and_leave_the_base_bit_identical(tiny_hf, quantize):
    model = Transformer.from_pretrained(tiny_hf, quantize=quantize, group_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.05)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = tokens(1), []
    for _ in range(4):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, before[name.replace(".base.", ".")]), name
    assert all(layer.lora_b.abs().sum() > 0 for layer in lora_layers(model).values())


def test_save_load_roundtrip_in_peft_layout(tiny_hf, adapter):
    config = json.loads((adapter / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["target_modules"] == HF_TARGETS
    assert config["base_model_name_or_path"] == str(tiny_hf)
    saved = adapted(tiny_hf)
    loaded = load_adapter(Transformer.from_pretrained(tiny_hf), adapter)
    for name, tensor in adapter_state_dict(saved).items():
        assert torch.equal(adapter_state_dict(loaded)[name], tensor), name
    assert all(p.requires_grad == (".lora_" in n) for n, p in loaded.named_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(tokens(2)), saved(tokens(2)))


def test_saving_replaces_an_adapter_but_no_other_folder(tiny_hf, tmp_path):
    model = adapted(tiny_hf, LoraConfig(rank=2, target_modules=("wq",)))
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        save_adapter(model, tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "x"


def test_peft_and_transformers_give_our_adapted_logits(tiny_hf, adapter):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.MistralForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ours = load_adapter(Transformer.from_pretrained(tiny_hf), adapter)
    batch = tokens(3)
    with torch.no_grad():
        expected = theirs(batch).logits
        got = ours(batch)
        base = Transformer.from_pretrained(tiny_hf)(batch)
    assert (got - base).abs().max() > 1e-2  # the adapter matters
    assert (got - expected).abs().max().item() <= 1e-4


def test_we_give_the_logits_of_an_adapter_peft_trained(tiny_hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    hf = transformers.MistralForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(Transformer.from_pretrained(tiny_hf), tmp_path / "peft")
    assert {n.rpartition(".")[2] for n in lora_layers(ours)} == {"wq", "wv", "w2"}
    batch = tokens(4)
    with torch.no_grad():
        assert (ours(batch) - theirs(batch).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_merged_layers_compute_the_adapted_model(tiny_hf, quantize):
    model = adapted(tiny_hf, quantize=quantize, group_size=32)
    batch = tokens(5)
    with torch.no_grad():
        expected = model(batch)
        got = merge_lora(model)(batch)
    assert not lora_layers(model)
    kinds = {type(m) for n, m in model.named_modules() if n.rpartition(".")[2] in LINEAR_NAMES}
    assert kinds == {nn.Linear}
    assert (got - expected).abs().max().item() <= 1e-4


def test_merge_command_writes_a_checkpoint_with_the_adapted_logits(tiny_hf, adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_hf), str(adapter), str(out), "--layout", "mistral"]) == 0
    assert (out / "consolidated.safetensors").is_file() and (out / "tekken.json").is_file()
    written = Transformer.from_pretrained(out)
    ours = load_adapter(Transformer.from_pretrained(tiny_hf), adapter)
    batch = tokens(6)
    with torch.no_grad():
        assert (written(batch) - ours(batch)).abs().max().item() <= 1e-5


def test_lora_flag_generates_as_the_merged_checkpoint(tiny_hf, adapter, merged, capsys):
    argv = ["--prompt", "Hello", "--max-tokens", "6", "--temperature", "0"]
    capsys.readouterr()
    assert main(["generate", str(tiny_hf), "--lora", str(adapter), *argv]) == 0
    with_flag = capsys.readouterr().out
    assert main(["generate", str(merged), *argv]) == 0
    assert with_flag == capsys.readouterr().out


def test_serve_and_chat_load_the_adapter_merged(tiny_hf, adapter, merged):
    args = build_parser().parse_args(
        ["serve", str(tiny_hf), "--lora", str(adapter), "--kv-cache-memory", "4MiB"]
    )
    args.model = args.model_arg
    llm = _load_llm(args, max_num_seqs=1)
    reference = LLM(merged, max_num_seqs=1, kv_cache_memory="4MiB")
    assert llm.path == tiny_hf and not lora_layers(llm.model)
    params = SamplingParams(temperature=0, max_tokens=6)
    answers = [e.generate("Hello", params)[0].outputs[0].token_ids for e in (llm, reference)]
    assert answers[0] == answers[1]


def test_lora_with_quantize_merges_then_quantizes(tiny_hf, adapter, merged):
    model = load_merged(tiny_hf, adapter, quantize="int8")
    reference = Transformer.from_pretrained(merged, quantize="int8")
    assert isinstance(model.layers[0].attention.wq, Int8Linear)
    batch = tokens(7)
    with torch.no_grad():
        assert torch.equal(model(batch), reference(batch))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"target_modules": ("wq", "attention_norm")}, "choose from wq"),
    ],
)
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**settings)


def test_adapters_that_do_not_fit_are_refused(tiny_hf, adapter, checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(Transformer.from_pretrained(checkpoints["mha", "hf"]), adapter)
    with pytest.raises(ConfigError, match="already has an adapter"):
        load_adapter(load_adapter(Transformer.from_pretrained(tiny_hf), adapter), adapter)
    (tmp_path / "dora").mkdir()
    config = json.loads((adapter / CONFIG_FILE).read_text())
    (tmp_path / "dora" / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    (tmp_path / "dora" / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(Transformer.from_pretrained(tiny_hf), tmp_path / "dora")


def test_merge_command_errors_are_one_line(tiny_hf, tmp_path, capsys):
    assert main(["merge", str(tiny_hf), str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and len(err.strip().splitlines()) == 1
