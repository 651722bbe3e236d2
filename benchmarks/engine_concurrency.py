"""A few concurrent requests on the demo model: the engine's batched decode steps vs serving
the same requests one after another with the plain generation loop, one run.

    python benchmarks/engine_concurrency.py [--formats fp32,int4] [--concurrency 1,2,4,8]

SmolLM2-135M-Instruct (the demo GGUF), loaded dequantized to fp32 or requantized to int4
(groups of 32). Each request: a distinct 64-token prompt, 128 greedy tokens (EOS ignored).
Up to 8 sequences, a decode step is one C call through every layer (kernels/decoder.py);
the figure of merit is aggregate generated tokens/s.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import save, table

from mistral_nemo import Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.generate import generate

FORMATS = {
    "fp32": {"dtype": torch.float32},
    "int4": {"dtype": torch.float32, "quantize": "int4", "group_size": 32},
}
OUTPUT = 128


def best_rate(run, tokens: int, repeats: int = 3) -> float:
    run()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def measure(model: Transformer, llm: LLM, n: int) -> tuple[float, float]:
    """(engine, one-by-one) generated tokens/s for n concurrent requests."""
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True)
    prompts = [list(range(100 + 7 * i, 164 + 7 * i)) for i in range(n)]

    def one_by_one() -> None:
        for p in prompts:
            list(generate(model, p, OUTPUT, temperature=0, stop_ids=[]))

    ours = best_rate(lambda: llm.generate(prompts, params), n * OUTPUT)
    return ours, best_rate(one_by_one, n * OUTPUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", default="fp32,int4")
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for fmt in args.formats.split(","):
        model = Transformer.from_pretrained(demo_model_path(), **FORMATS[fmt])
        llm = LLM(model, kv_cache_memory="1GiB")
        for n in (int(c) for c in args.concurrency.split(",")):
            ours, peer = measure(model, llm, n)
            rows.append(
                {
                    "format": fmt,
                    "requests": n,
                    "engine tok/s": ours,
                    "one by one tok/s": peer,
                    "ratio": ours / peer,
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    save("engine_concurrency", {"output": OUTPUT, "rows": rows})


if __name__ == "__main__":
    main()
