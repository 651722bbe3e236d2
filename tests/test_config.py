import json

import pytest
import torch

from mistral_nemo import ConfigError, ModelConfig


def test_nemo_preset_numbers():
    c = ModelConfig.preset("nemo-12b")
    assert (c.n_layers, c.dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.head_dim) == (
        40,
        5120,
        14336,
        32,
        8,
        128,
    )
    assert c.head_dim != c.dim // c.n_heads
    assert (c.rope_theta, c.norm_eps, c.vocab_size, c.max_seq_len) == (1e6, 1e-5, 131072, 131072)
    assert not c.tie_embeddings
    assert 12.2e9 < c.num_parameters() < 12.3e9
    assert c.kv_bytes_per_token(torch.bfloat16) == 160 * 1024
    assert c.kv_bytes_per_token(torch.bfloat16) * 131072 == 20 * 2**30  # 20 GiB at 128k
    assert c.kv_bytes_per_token(torch.float8_e4m3fn) * 131072 == 10 * 2**30


def test_minitron_preset_is_nemo_pruned_in_width():
    c = ModelConfig.preset("minitron-8b")
    assert (c.dim, c.hidden_dim, c.n_layers, c.head_dim) == (4096, 11520, 40, 128)
    assert 8.0e9 < c.num_parameters() < 8.5e9


def test_tiny_preset_is_small_and_keeps_head_dim_independent():
    c = ModelConfig.preset("tiny")
    assert c.head_dim != c.dim // c.n_heads
    assert c.num_parameters() * 2 < 40e6  # bytes in bf16


def test_num_parameters_matches_the_model():
    from mistral_nemo import Transformer

    c = ModelConfig.preset("tiny")
    with torch.device("meta"):
        model = Transformer(c)
    assert c.num_parameters() == sum(p.numel() for p in model.parameters())


def test_released_nemo_config_json_caps_context_at_128k():
    # Mistral-Nemo-Instruct-2407's config.json (the fields that matter).
    hf = {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 5120,
        "head_dim": 128,
        "intermediate_size": 14336,
        "max_position_embeddings": 1024000,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "vocab_size": 131072,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    c = ModelConfig.from_hf(hf)
    assert c == ModelConfig.preset("nemo-12b")
    assert ModelConfig.from_hf(c.to_hf()) == c


def test_params_json_round_trip():
    params = {
        "dim": 5120,
        "n_layers": 40,
        "head_dim": 128,
        "hidden_dim": 14336,
        "n_heads": 32,
        "n_kv_heads": 8,
        "norm_eps": 1e-05,
        "vocab_size": 131072,
        "rope_theta": 1000000.0,
    }
    c = ModelConfig.from_params(params)
    assert c == ModelConfig.preset("nemo-12b")
    assert ModelConfig.from_params(c.to_params()) == c


def test_transformers_v5_rope_parameters():
    c = ModelConfig.preset("tiny")
    hf = c.to_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert ModelConfig.from_hf(hf) == c


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_heads": 6, "n_kv_heads": 4}, "divisible"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"n_layers": -1}, "n_layers"),
        ({"head_dim": 33}, "even"),
        ({"vocab_size": 1.5}, "vocab_size"),
    ],
)
def test_invalid_configs_raise_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("tiny").replace(**change)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nemo-13b'"):
        ModelConfig.preset("nemo-13b")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no params.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="lacks the field 'num_attention_heads'"):
        ModelConfig.from_dir(tmp_path)
