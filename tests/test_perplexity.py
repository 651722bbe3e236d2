"""Perplexity (`mistral_nemo.eval.perplexity`), checked against the same protocol computed
from llama.cpp's logits and from transformers', on a slice of the package's corpus.

llama.cpp gets a float32 copy of the demo GGUF (made by its own quantizer): on the Q4_1 file
it rounds activations to 8 bits for its dot products, which alone moves the perplexity by
~0.7%, while ours and transformers' multiply the dequantized weights in float32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp_oracle import float32_copy, load_llama

from mistral_nemo import InvalidRequestError, Transformer
from mistral_nemo.checkpoint.gguf_export import export_gguf
from mistral_nemo.cli import main
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.perplexity import (
    CORPUS,
    PerplexityResult,
    evaluate_perplexity,
    read_text,
    stride_windows,
)
from mistral_nemo.tokenizer import Tokenizer, load_tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file

pytest.importorskip("llama_cpp")

CTX = 64
SLICE = CORPUS.read_text(encoding="utf-8")[:2000]  # ~500 tokens: 7 chunks of 64


@pytest.fixture(scope="module")
def demo() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def demo_model(demo: Path) -> Transformer:
    return Transformer.from_pretrained(demo)


@pytest.fixture(scope="module")
def demo_result(demo: Path, demo_model: Transformer) -> PerplexityResult:
    """llama.cpp's protocol on the slice, one chunk per forward pass."""
    return evaluate_perplexity(demo_model, load_tokenizer(demo), SLICE, ctx=CTX, batch=1)


@pytest.fixture(scope="module")
def demo_f32(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return float32_copy(demo, tmp_path_factory.mktemp("ppl") / "demo-f32.gguf")


def protocol_ppl(chunk_logits, tokens: list[int], ctx: int, bos_id: int | None) -> float:
    """llama-perplexity's estimate, written out from its perplexity.cpp: chunks of ctx (tail
    dropped), first token BOS if the vocabulary adds it, logits at ctx/2 .. ctx-2 scored
    against the next token. `chunk_logits(ids)` gives [ctx, vocab] logits of one chunk
    evaluated from an empty cache."""
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(len(tokens) // ctx):
        chunk = tokens[i * ctx : (i + 1) * ctx]
        ids = [bos_id, *chunk[1:]] if bos_id is not None else chunk
        logits = np.asarray(chunk_logits(ids), dtype=np.float64)[first : ctx - 1]
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll += float((log_z - logits[np.arange(len(logits)), chunk[first + 1 :]]).sum())
        count += ctx - 1 - first
    return math.exp(nll / count)


def llama_cpp_logits(path: Path, ctx: int):
    ll = load_llama(path, n_ctx=ctx, n_threads=2, logits_all=True, type_k=0, type_v=0)

    def chunk_logits(ids: list[int]) -> np.ndarray:
        ll.reset()
        ll.eval(ids)
        return np.array(ll.scores[: len(ids)])

    return ll, chunk_logits


def transformers_logits(path: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)

    @torch.inference_mode()
    def chunk_logits(ids: list[int]) -> np.ndarray:
        return hf(torch.tensor([ids])).logits[0].float().numpy()

    return chunk_logits


def test_corpus_is_long_redistributable_and_machine_free():
    text = CORPUS.read_text(encoding="utf-8")
    assert len(text.encode()) < 600_000
    header = " ".join(text[:1000].split())
    assert "PSF License Agreement" in header and "Python Software Foundation" in header
    assert not re.search(r" at 0x[0-9a-f]+|/root|/home/|/usr/|site-packages", text)
    demo_tokens = load_tokenizer(demo_model_path()).encode(text)
    tekken_tokens = Tokenizer.from_file(reference_tekken_file()).encode(text)
    assert len(demo_tokens) >= 100_000 and len(tekken_tokens) >= 100_000


def test_matches_llama_cpp_and_transformers_on_the_demo_model(demo, demo_result, demo_f32):
    tokenizer = load_tokenizer(demo)
    ours = demo_result
    tokens = tokenizer.encode(SLICE, bos=True)
    ll, llama_chunks = llama_cpp_logits(demo_f32, CTX)
    # llama-perplexity tokenizes the file with add_special: the same stream as ours
    assert ll.tokenize(SLICE.encode(), add_bos=True, special=False) == tokens
    bos = None  # the demo GGUF says tokenizer.ggml.add_bos_token = false
    theirs = protocol_ppl(llama_chunks, tokens, CTX, bos)
    hf = protocol_ppl(transformers_logits(demo.parent, demo.name), tokens, CTX, bos)
    assert ours.chunks == len(tokens) // CTX and ours.tokens == ours.chunks * (CTX - 1 - CTX // 2)
    assert ours.ppl == pytest.approx(theirs, rel=1e-4)
    assert ours.ppl == pytest.approx(hf, rel=1e-4)


def test_matches_llama_cpp_and_transformers_with_tekken_and_bos(tiny_mistral, tiny_hf, tmp_path):
    """The tiny random NeMo (Tekken adds BOS: each chunk starts with it) as GGUF in llama.cpp
    and in its Hugging Face layout in transformers."""
    gguf = tmp_path / "tiny-f32.gguf"
    export_gguf(tiny_mistral, gguf, "f32")
    tokenizer = load_tokenizer(tiny_mistral)
    ours = evaluate_perplexity(Transformer.from_pretrained(tiny_mistral), tokenizer, SLICE, ctx=CTX)
    tokens = tokenizer.encode(SLICE, bos=True)
    assert tokens[0] == tokenizer.bos_id
    _, llama_chunks = llama_cpp_logits(gguf, CTX)
    theirs = protocol_ppl(llama_chunks, tokens, CTX, tokenizer.bos_id)
    hf = protocol_ppl(transformers_logits(tiny_hf), tokens, CTX, tokenizer.bos_id)
    assert ours.ppl == pytest.approx(theirs, rel=1e-4)
    assert ours.ppl == pytest.approx(hf, rel=1e-4)


def test_batch_size_does_not_change_the_result(demo, demo_model, demo_result):
    """Up to float32 rounding: a batch's products are summed in another order."""
    many = evaluate_perplexity(demo_model, load_tokenizer(demo), SLICE, ctx=CTX, batch=3)
    assert many.tokens == demo_result.tokens and many.bytes == demo_result.bytes
    assert many.ppl == pytest.approx(demo_result.ppl, rel=1e-5)
    assert many.running == pytest.approx(demo_result.running, rel=1e-5)


@pytest.mark.parametrize(
    ("n", "ctx", "stride"),
    [(1000, 64, 32), (1000, 64, 63), (1001, 100, 7), (50, 64, 16), (2, 2, 1)],
)
def test_stride_windows_score_every_token_once(n, ctx, stride):
    windows = stride_windows(n, ctx, stride)
    assert all(w.length <= ctx for w in windows)
    assert [p for w in windows for p in w.targets] == list(range(1, n))
    # every window after the first sees ctx - stride tokens before its targets
    assert all(w.scored_from + 1 == ctx - stride for w in windows[1:])


def test_stride_mode_and_bits_per_byte(demo, demo_model, demo_result):
    tokenizer = load_tokenizer(demo)
    result = evaluate_perplexity(demo_model, tokenizer, SLICE, ctx=CTX, stride=32, batch=8)
    tokens = tokenizer.encode(SLICE, bos=True)
    assert result.protocol == "stride" and result.tokens == len(tokens) - 1
    # all tokens but the first are scored: their bytes are the text's but the first token's
    assert result.bytes == len(SLICE.encode()) - len(tokenizer.token_bytes(tokens[0]))
    assert result.bpb * result.bytes * math.log(2) == pytest.approx(result.nll, rel=1e-12)
    assert result.ppl == pytest.approx(math.exp(result.nll / result.tokens), rel=1e-12)
    chunks = demo_result
    assert chunks.bpb * chunks.bytes * math.log(2) == pytest.approx(chunks.nll, rel=1e-12)


def test_fp8_kv_cache_moves_perplexity_a_little(demo, demo_model, demo_result):
    tokenizer = load_tokenizer(demo)
    fp8 = evaluate_perplexity(demo_model, tokenizer, SLICE, ctx=CTX, batch=4, kv_cache_dtype="fp8")
    assert fp8.kv_cache_dtype == "fp8" and fp8.tokens == demo_result.tokens
    assert 0 < abs(fp8.ppl - demo_result.ppl) < 0.05 * demo_result.ppl


def test_cli_prints_the_estimate_and_writes_json(demo, tmp_path, capsys):
    text = tmp_path / "slice.txt"
    text.write_text(SLICE, encoding="utf-8")
    out = tmp_path / "ppl.json"
    args = f"eval perplexity {demo} {text} --ctx {CTX} --batch 4 --chunks 3 --json {out}"
    assert main(args.split()) == 0
    printed = capsys.readouterr().out
    assert "[1]" in printed and "Final estimate: PPL = " in printed
    saved = json.loads(out.read_text())
    expected = "ppl stderr bpb tokens chunks ctx protocol model quantization kv_cache_dtype"
    assert {*expected.split(), "seconds", "tokens_per_s"} <= saved.keys()
    assert saved["ctx"] == CTX and saved["chunks"] == 3 and saved["protocol"] == "llama.cpp"
    assert saved["model"] == str(demo) and saved["tokens"] == 3 * (CTX - 1 - CTX // 2)
    assert f"PPL = {saved['ppl']:.4f} +/- {saved['stderr']:.5f}" in printed


def test_malformed_input_gets_a_clear_error(demo, demo_model, tmp_path, capsys):
    tokenizer = load_tokenizer(demo)

    def error(**kwargs) -> str:
        with pytest.raises(InvalidRequestError) as e:
            evaluate_perplexity(demo_model, tokenizer, **{"text": SLICE, "ctx": CTX, **kwargs})
        return str(e.value)

    assert "empty" in error(text="")
    assert "shorter than one chunk of ctx 64" in error(text="just a few words")
    assert "ctx 2 is too small" in error(ctx=2)
    assert "ctx 1 is too small" in error(ctx=1, stride=1)
    assert "stride 64 must be" in error(stride=64)
    assert "batch 0" in error(batch=0)
    assert "chunks 0" in error(chunks=0)
    assert "exceeds the model's context" in error(ctx=10**6)
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(InvalidRequestError, match="empty"):
        read_text(empty)
    with pytest.raises(InvalidRequestError, match="not UTF-8"):
        read_text(latin1)
    with pytest.raises(InvalidRequestError, match="no such file"):
        read_text(tmp_path / "missing.txt")
    assert main(["eval", "perplexity", str(demo), str(empty)]) == 1
    assert "empty.txt: the file is empty" in capsys.readouterr().err
