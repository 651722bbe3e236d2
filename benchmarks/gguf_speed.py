"""Ours vs llama.cpp (llama-cpp-python) on the same GGUF, same thread count.

    python benchmarks/gguf_speed.py [--gguf FILE] [--threads 2] [--formats fp32,bf16,int8,int4]

Default file: SmolLM2-135M-Instruct Q4_1, the demo model. Prefill: one forward over a
512-token prompt. Decode: 128 greedy tokens after a 16-token prompt, timed from the first
token to the last. Ours loads the GGUF dequantized to fp32 or bf16, or requantized
to our int8 (per channel) or int4 (groups of 32, as Q4_1) formats. Runs alternate, best of
several each.
"""

from __future__ import annotations

import argparse
import gc
import time

import llama_cpp
import numpy as np
import torch
from common import best_time, decode_rate, read_bandwidth_gbs, save, table

from mistral_nemo import Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.generate import generate
from mistral_nemo.runtime import ModelRunner

FORMATS = {
    "fp32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "int8": {"dtype": torch.float32, "quantize": "int8"},
    "int4": {"dtype": torch.float32, "quantize": "int4", "group_size": 32},
    "int4-g64": {"dtype": torch.float32, "quantize": "int4", "group_size": 64},
}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every weight but the embedding table (a row of it; a
    tied LM head is `output.weight` too)."""
    skip = ("tok_embeddings",)
    return sum(t.nbytes for n, t in model.state_dict().items() if not any(k in n for k in skip))


def ours(path, fmt: str, prompt: list[int], decode_prompt: list[int]):
    model = Transformer.from_pretrained(path, **FORMATS[fmt])
    runner = ModelRunner(model)
    tokens = torch.tensor([prompt])

    def prefill() -> None:
        with torch.inference_mode():
            runner.logits(tokens, 0, model.new_cache(1, len(prompt)), last_only=True)

    def decode() -> float:
        return decode_rate(generate(model, decode_prompt, 129, temperature=0, stop_ids=[]), 128)

    return prefill, decode, weight_bytes(model)


def llama(path, threads: int, prompt: list[int], decode_prompt: list[int]):
    ll = llama_cpp.Llama(
        str(path),
        n_ctx=1024,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def prefill() -> None:
        ll.reset()
        ll.eval(prompt)

    def decode() -> float:
        ll.reset()
        return decode_rate(ll.generate(decode_prompt, temp=0.0, top_k=1, reset=True), 128)

    return prefill, decode, None


def measure(prefill, decode, repeats: int) -> tuple[float, float]:
    t_prefill = best_time(prefill, repeats)
    return 512 / t_prefill, max(decode() for _ in range(max(2, repeats // 2)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="fp32,bf16,int8,int4,int4-g64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or demo_model_path()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20_000, 512).tolist()
    decode_prompt = prompt[:16]

    runners = {"llama.cpp": llama(path, args.threads, prompt, decode_prompt)}
    for fmt in args.formats.split(","):
        runners[f"ours {fmt}"] = ours(path, fmt, prompt, decode_prompt)
    best: dict[str, tuple[float, float]] = {}
    for _round in range(2):  # alternate, keep each one's best
        for name, (prefill, decode, _) in runners.items():
            p, d = measure(prefill, decode, args.repeats)
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], p), max(old[1], d))
            gc.collect()
            time.sleep(0.5)
    bandwidth = read_bandwidth_gbs()
    ref_p, ref_d = best["llama.cpp"]
    rows = []
    for name, (p, d) in best.items():
        nbytes = runners[name][2]
        gbs = nbytes * d / 1e9 if nbytes else None
        rows.append(
            {
                "run": name,
                "prefill tok/s": p,
                "vs llama.cpp": p / ref_p,
                "decode tok/s": d,
                "vs llama.cpp ": d / ref_d,
                "decode GB/s": gbs or "",
                "share of bw": f"{gbs / bandwidth:.0%}" if gbs else "",
            }
        )
    print(
        f"{path.name if hasattr(path, 'name') else path}, {args.threads} threads, "
        f"read bandwidth {bandwidth:.1f} GB/s"
    )
    print(table(rows, list(rows[0])))
    save("gguf_speed", {"gguf": str(path), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
