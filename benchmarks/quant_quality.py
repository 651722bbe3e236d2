"""Quality of every quantization on a real model: perplexity of the demo model
(SmolLM2-135M-Instruct) on the package's corpus, ours beside llama.cpp's own quantizations of
the same weights, with bits per weight.

    python benchmarks/quant_quality.py [--chunks 20] [--variants fp32,int4-g32,...] [--no-llama]

Text: src/mistral_nemo/eval/data/corpus.txt, split at a line boundary at `CALIBRATION_CHARS`:
the part before calibrates (the `+gptq` variants' Hessians, from its first
CALIBRATION_CHUNKS x 512 tokens), the part after is evaluated
(~97k tokens; `--chunks N` keeps its first N chunks). Protocol: llama-perplexity's at ctx
512 (`mistral_nemo.eval.perplexity`), the same token ids for llama.cpp (its chunks and
scored positions computed here, float32 KV cache). Each side's change is relative to its own
full-precision run: ours fp32 (the GGUF's weights dequantized), llama.cpp F32 (the same
weights written by llama.cpp's quantizer, from which its Q8_0, Q4_0, Q4_1 and Q4_K_M are
made).

Bits per weight: the bytes of the weight matrices (every linear layer and the LM head, the
tied embedding counted once as the head) over their parameters, scales included.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import save, table

from mistral_nemo import Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.perplexity import CORPUS, adds_bos, chunk_windows, evaluate_perplexity
from mistral_nemo.quant import quantize_linear
from mistral_nemo.quant.calibration import calibration_batches, quantize_model
from mistral_nemo.tokenizer import load_tokenizer

CALIBRATION_CHARS = 100_000
CALIBRATION_CHUNKS = 16  # of CTX tokens, from the calibration part
CTX = 512


@dataclass(frozen=True)
class Variant:
    load: dict[str, object] = field(default_factory=dict)  # from_pretrained's arguments
    kv: str = "auto"  # KV cache dtype
    calibrated: tuple[str, int] | None = None  # (scheme, group size) by quantize_model
    head: str | None = None  # the LM head's scheme, where not the layers'


OURS = {
    "fp32": Variant(),
    "bf16": Variant({"dtype": torch.bfloat16}),
    "fp8": Variant({"quantize": "fp8"}),
    "fp8-channel": Variant({"quantize": "fp8-channel"}),
    "int8": Variant({"quantize": "int8"}),
    "int4-g32": Variant({"quantize": "int4", "group_size": 32}),
    "int4-g64": Variant({"quantize": "int4", "group_size": 64}),
    "int4-g128": Variant({"quantize": "int4", "group_size": 128}),
    "int4-g32 int4-head": Variant({"quantize": "int4", "group_size": 32}, head="int4"),
    "fp32 + fp8 KV": Variant(kv="fp8"),
    "fp8+gptq": Variant(calibrated=("fp8", 128)),
    "fp8-channel+gptq": Variant(calibrated=("fp8-channel", 128)),
    "int8+gptq": Variant(calibrated=("int8", 128)),
    "int4-g64+gptq": Variant(calibrated=("int4", 64)),
    "int4-g128+gptq": Variant(calibrated=("int4", 128)),
}
LLAMA = {
    "F32": "ALL_F32",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_K_M": "MOSTLY_Q4_K_M",
}


def corpus_parts() -> tuple[str, str]:
    """(calibration text, evaluation text): the corpus cut at the first line break past
    CALIBRATION_CHARS."""
    text = CORPUS.read_text(encoding="utf-8")
    cut = text.index("\n", CALIBRATION_CHARS) + 1
    return text[:cut], text[cut:]


def matrix_bits(model: Transformer) -> tuple[int, int]:
    """(bits, parameters) of the linear layers and the LM head, as stored in memory."""
    bits = params = 0
    layers = [
        m for b in model.layers for m in (*b.attention.children(), *b.feed_forward.children())
    ]
    for module in [*layers, model.output]:
        tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
        bits += sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        params += int(module.out_features) * int(module.in_features)
    return bits, params


def ours(name: str, path: Path, tokenizer, text: str, calibration: str, chunks: int | None) -> dict:
    variant = OURS[name]
    start = time.perf_counter()
    model = Transformer.from_pretrained(path, **variant.load)  # type: ignore[arg-type]
    if variant.calibrated is not None:
        tokens = tokenizer.encode(calibration, bos=True)
        batches = calibration_batches(tokens, CTX, CALIBRATION_CHUNKS)
        model = quantize_model(model, *variant.calibrated, batches, head_scheme=variant.head)
    elif variant.head is not None:  # the tied embedding, requantized
        group = int(variant.load.get("group_size", 128))  # type: ignore[call-overload]
        model.output = quantize_linear(model.tok_embeddings.weight, variant.head, group)
    quantized = time.perf_counter() - start
    result = evaluate_perplexity(
        model, tokenizer, text, CTX, batch=4, kv_cache_dtype=variant.kv, chunks=chunks
    )
    bits, params = matrix_bits(model)
    groups = sorted({getattr(m, "group_size", 0) for m in model.modules()} - {0})
    return {
        "variant": name,
        "ppl": result.ppl,
        "stderr": result.stderr,
        "bpw": bits / params,
        "groups": groups,
        "quantize_s": quantized,
        "tokens": result.tokens,
    }


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp's quantizer writes a line per tensor to fd 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def llama_files(folder: Path, kinds: list[str]) -> dict[str, Path]:
    """llama.cpp's F32 GGUF of the demo weights (dequantized by its own quantizer), and its
    quantizations made from that F32."""
    import llama_cpp

    def quantize(src: Path, dst: Path, ftype: str) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
        params.allow_requantize = True  # the demo file is Q4_1
        params.nthread = torch.get_num_threads()
        with quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        assert rc == 0, (src, ftype, rc)

    f32 = folder / "F32.gguf"
    quantize(demo_model_path(), f32, LLAMA["F32"])
    out = {"F32": f32}
    for kind in kinds:
        if kind != "F32":
            out[kind] = folder / f"{kind}.gguf"
            quantize(f32, out[kind], LLAMA[kind])
    return out


def gguf_bits(path: Path) -> tuple[int, int]:
    import gguf

    reader = gguf.GGUFReader(path)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    return sum(int(t.n_bytes) * 8 for t in matrices), sum(int(t.n_elements) for t in matrices)


def llama_perplexity(
    path: Path, tokens: list[int], bos_first: bool, bos: int, chunks: int | None
) -> dict:
    """llama-perplexity's protocol on `tokens`, as mistral_nemo.eval.perplexity runs it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from llama_cpp_oracle import load_llama

    llm = load_llama(
        path,
        n_ctx=CTX,
        n_batch=CTX,
        n_ubatch=CTX,
        logits_all=True,
        n_threads=torch.get_num_threads(),
        type_k=0,
        type_v=0,
    )
    nll: list[float] = []
    for window in chunk_windows(len(tokens), CTX, bos_first)[:chunks]:
        ids = tokens[window.start : window.end]
        if window.bos_first:
            ids = [bos, *ids[1:]]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[window.scored_from : CTX - 1], dtype=np.float64)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        targets = np.asarray(ids[window.scored_from + 1 :])
        nll.extend((lse - logits[np.arange(len(targets)), targets]).tolist())
    del llm
    gc.collect()
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    stderr = float(np.std(nll) / math.sqrt(len(nll) - 1)) * ppl
    bits, params = gguf_bits(path)
    return {
        "variant": f"llama.cpp {path.stem}",
        "ppl": ppl,
        "stderr": stderr,
        "bpw": bits / params,
        "tokens": len(nll),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=None, help="first N chunks of 512")
    parser.add_argument("--variants", default=",".join(OURS), help="ours, comma-separated")
    parser.add_argument("--llama", default=",".join(LLAMA), help="llama.cpp's, comma-separated")
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument("--out", default="quant_quality")
    args = parser.parse_args()

    path = demo_model_path()
    tokenizer = load_tokenizer(path)
    calibration, text = corpus_parts()
    rows = []
    for name in args.variants.split(","):
        try:
            rows.append(ours(name, path, tokenizer, text, calibration, args.chunks))
        except Exception as e:  # a variant this version cannot run (the "before" table)
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        print(table(rows[-1:], ["variant", "ppl", "bpw", "groups", "error"]), flush=True)
    if not args.no_llama:
        tokens = tokenizer.encode(text, bos=True)
        with tempfile.TemporaryDirectory() as folder:
            files = llama_files(Path(folder), args.llama.split(","))
            for path_ in files.values():
                rows.append(
                    llama_perplexity(
                        path_, tokens, adds_bos(tokenizer), tokenizer.bos_id, args.chunks
                    )
                )
                print(table(rows[-1:], ["variant", "ppl", "bpw"]), flush=True)
    for base in ("fp32", "llama.cpp F32"):
        ref = next((r["ppl"] for r in rows if r["variant"] == base), None)
        side = [
            r
            for r in rows
            if "ppl" in r and r["variant"].startswith("llama.cpp") == (base != "fp32")
        ]
        for r in side:
            if ref is not None:
                r["change_%"] = 100 * (r["ppl"] / ref - 1)
    print(table(rows, ["variant", "ppl", "change_%", "stderr", "bpw", "groups", "error"]))
    payload = {
        "ctx": CTX,
        "chunks": args.chunks,
        "calibration_chars": len(calibration),
        "calibration_chunks": CALIBRATION_CHUNKS,
        "rows": rows,
    }
    print(save(args.out, payload))


if __name__ == "__main__":
    main()
