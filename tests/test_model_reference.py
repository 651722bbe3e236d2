"""Our model against transformers' MistralForCausalLM on the same checkpoint folders."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS

from mistral_nemo import Transformer
from mistral_nemo.generate import generate

transformers = pytest.importorskip("transformers")

CASES = [(name, layout) for name in CONFIGS for layout in ("hf", "mistral")]


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {
        name: transformers.MistralForCausalLM.from_pretrained(
            checkpoints[name, "hf"], dtype=torch.float32
        ).eval()
        for name in CONFIGS
    }


def prompt(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(
        1000, 131072, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("name, layout", CASES)
def test_fp32_logits_match_transformers(checkpoints, hf_models, name, layout):
    ours = Transformer.from_pretrained(checkpoints[name, layout])
    tokens = prompt(0, 48, batch=2)
    with torch.no_grad():
        expected = hf_models[name](tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name, layout", CASES)
def test_32_greedy_tokens_match_transformers(checkpoints, hf_models, name, layout):
    ours = Transformer.from_pretrained(checkpoints[name, layout])
    tokens = prompt(1, 12)
    with torch.no_grad():
        expected = (
            hf_models[name]
            .generate(
                tokens, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, 12:]
            .tolist()
        )
    got = list(generate(ours, tokens[0].tolist(), max_tokens=32, temperature=0, stop_ids=[]))
    assert len(expected) == 32
    assert got == expected


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cached_decode_equals_full_forward(checkpoints, name):
    model = Transformer.from_pretrained(checkpoints[name, "mistral"])
    tokens = prompt(2, 40, batch=2)
    cache = model.new_cache(2, 40)
    with torch.no_grad():
        full = model(tokens)
        steps = [
            model(tokens[:, :20], 0, cache),  # prefill
            model(tokens[:, 20:28], 20, cache),
        ]  # a chunk after cached tokens
        steps += [model(tokens[:, i : i + 1], i, cache) for i in range(28, 40)]  # decode
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_bf16_runs_close_to_fp32(tiny_mistral):
    fp32 = Transformer.from_pretrained(tiny_mistral)
    bf16 = Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    tokens = prompt(3, 16)
    with torch.no_grad():
        a, b = fp32(tokens), bf16(tokens).float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_mistral):
    cpu = Transformer.from_pretrained(tiny_mistral)
    gpu = Transformer.from_pretrained(tiny_mistral, device="cuda")
    tokens = prompt(4, 16)
    with torch.no_grad():
        assert (gpu(tokens.cuda()).cpu() - cpu(tokens)).abs().max() < 1e-3
