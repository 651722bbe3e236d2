"""Batch-1 decode over model shapes and weight formats: each one's share of the machine's
read bandwidth and its speed against transformers, so that a regression on any shape shows.

    python benchmarks/shapes.py [--shapes tiny,narrow,smollm2,mid,nemo-2layer]
                                [--formats fp32,bf16,fp8,int8,int4] [--decode 32]

Every shape is a random checkpoint (Hugging Face layout) written here. Ours: greedy decode of
`--decode` tokens after a 16-token prompt through `generate`, with the weights loaded as
`--formats` says (the quantized ones by `quantize` at load, int4 in groups of 128 or the
width). Transformers: MistralForCausalLM on the same checkpoint in fp32 and bf16; a quantized
format is set against transformers in bf16 (what one would run instead). Decode GB/s counts
the bytes of every weight a token reads (all but the embedding table, in the format loaded).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from common import best_time, decode_rate, read_bandwidth_gbs, save, table
from transformers import MistralForCausalLM

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.generate import generate

SHAPES = {
    # A narrow model with NeMo's 131k vocabulary: the LM head is most of each token.
    "tiny": ModelConfig.preset("tiny"),
    "narrow": ModelConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=768,
        vocab_size=131072, max_seq_len=4096,
    ),
    # SmolLM2-135M (the demo model's shape).
    "smollm2": ModelConfig(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
        vocab_size=49152, max_seq_len=4096, rope_theta=100000.0,
    ),
    # A Llama-like 0.4 B model: 2048 wide, MHA-ish GQA, a 32k vocabulary.
    "mid": ModelConfig(
        dim=2048, n_layers=6, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=5632,
        vocab_size=32000, max_seq_len=4096,
    ),
    # NeMo's real widths and vocabulary, 2 of its 40 layers (~1.9 B parameters).
    "nemo-2layer": ModelConfig.preset("nemo-12b").replace(n_layers=2),
}  # fmt: skip
FORMATS = {
    "fp32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "fp8": {"dtype": torch.float32, "quantize": "fp8"},
    "int8": {"dtype": torch.float32, "quantize": "int8"},
    "int4": {"dtype": torch.float32, "quantize": "int4"},
}
PROMPT = 16


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads: every tensor but the embedding table (a row of it only)."""
    return sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if not name.startswith("tok_embeddings")
    )


def ours(path: Path, config: ModelConfig, fmt: str, prompt: list[int], decode: int) -> dict:
    options = dict(FORMATS[fmt])
    if "quantize" in options:
        options["group_size"] = min(128, config.dim)
    model = Transformer.from_pretrained(path, **options)  # type: ignore[arg-type]

    def run() -> float:
        return decode_rate(generate(model, prompt, decode + 1, temperature=0, stop_ids=[]), decode)

    return {"rate": max(run() for _ in range(3)), "bytes": weight_bytes(model)}


def transformers_rate(path: Path, dtype: torch.dtype, prompt: list[int], decode: int) -> float:
    model = MistralForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(2)  # warm up
    one, full = best_time(lambda: gen(1), 2), best_time(lambda: gen(decode + 1), 2)
    return decode / (full - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    bandwidth = read_bandwidth_gbs()
    print(f"{torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        config = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1000, config.vocab_size, (PROMPT,), generator=g).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / shape
            init_random(path, config, "hf", seed=0, dtype=torch.float32)
            theirs = {
                name: transformers_rate(path, FORMATS[name]["dtype"], prompt, args.decode)  # type: ignore[arg-type]
                for name in ("fp32", "bf16")
            }
            gc.collect()
            for fmt in args.formats.split(","):
                m = ours(path, config, fmt, prompt, args.decode)
                gc.collect()
                rate, size = m["rate"], m["bytes"]
                peer = theirs.get(fmt, theirs["bf16"])
                rows.append(
                    {
                        "shape": shape,
                        "params (B)": config.num_parameters() / 1e9,
                        "format": fmt,
                        "decode tok/s": rate,
                        "GB/s": size * rate / 1e9,
                        "share of bw": size * rate / 1e9 / bandwidth,
                        "transformers tok/s": peer,
                        "vs transformers": rate / peer,
                    }
                )
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    save("shapes", {"config": vars(args), "bandwidth_gbs": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
