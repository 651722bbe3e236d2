"""Prefill and batch-1 decode speed: ours vs transformers' MistralForCausalLM, same checkpoint.

    python benchmarks/model_speed.py [--configs tiny,nemo-2layer] [--dtypes fp32,bf16]

Prefill: one forward over a 512-token prompt (LM head on the last position, as generate does).
Decode: greedy generation of 128 tokens after that prompt, timed as t(129 tokens) - t(1 token).
Ours and transformers run alternately, best of several runs each. Decode GB/s counts the
weight bytes read per token (all but the embedding table) and is set against the best read
bandwidth measured between the decode runs.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from common import best_time, read_bandwidth_gbs, save, table
from transformers import MistralForCausalLM

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.generate import generate
from mistral_nemo.runtime import ModelRunner

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    # Real NeMo dims and vocabulary, 2 of the 40 layers: ~1.9 B parameters.
    "nemo-2layer": ModelConfig.preset("nemo-12b").replace(n_layers=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours_runner(path: Path, prompt: torch.Tensor):
    model = Transformer.from_pretrained(path)
    runner = ModelRunner(model)
    ids = prompt[0].tolist()

    def prefill() -> None:
        with torch.inference_mode():
            runner.logits(prompt, 0, model.new_cache(1, prompt.shape[1]), last_only=True)

    def gen(n: int) -> None:
        list(generate(model, ids, max_tokens=n, temperature=0, stop_ids=[]))

    return prefill, gen


def hf_runner(path: Path, prompt: torch.Tensor):
    model = MistralForCausalLM.from_pretrained(path, dtype="auto").eval()

    def prefill() -> None:
        with torch.inference_mode():
            model(prompt, logits_to_keep=1, use_cache=True)

    def gen(n: int) -> None:
        with torch.inference_mode():
            model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    return prefill, gen


def measure(path: Path, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    """Best times of ours and transformers, run alternately so that both see the same
    machine (its speed drifts with the neighbours' load), and the best read bandwidth
    measured between the decode runs."""
    runners = {"ours": ours_runner(path, prompt), "hf": hf_runner(path, prompt)}
    best: dict[str, float] = {}

    def record(key: str, fn) -> None:
        best[key] = min(best.get(key, float("inf")), best_time(fn, 1, warmup=0))

    for prefill, gen in runners.values():  # warm up both
        prefill()
        gen(2)
    for _ in range(repeats):
        for name, (prefill, gen) in runners.items():
            record(f"{name}_prefill", prefill)
            record(f"{name}_one", lambda gen=gen: gen(1))
    bandwidth = 0.0
    for _ in range(max(1, repeats // 2)):
        for name, (_, gen) in runners.items():
            record(f"{name}_all", lambda gen=gen: gen(decode + 1))
        bandwidth = max(bandwidth, read_bandwidth_gbs(repeats=3))
    gc.collect()
    out: dict[str, float] = {"bandwidth": bandwidth}
    for name in runners:
        out[f"{name}_prefill"] = prompt.shape[1] / best[f"{name}_prefill"]
        out[f"{name}_decode"] = decode / (best[f"{name}_all"] - best[f"{name}_one"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads")
    rows = []
    for cname in args.configs.split(","):
        config = CONFIGS[cname]
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            weight_bytes = (config.num_parameters() - config.vocab_size * config.dim) * (
                dtype.itemsize
            )
            repeats = 6 if config.num_parameters() < 1e8 else 4
            prompt = torch.randint(1000, config.vocab_size, (1, args.prompt))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ckpt"
                init_random(path, config, "hf", seed=0, dtype=dtype)
                m = measure(path, prompt, args.decode, repeats)
            decode_gbs = weight_bytes * m["ours_decode"] / 1e9
            rows.append(
                {
                    "config": cname,
                    "dtype": dname,
                    "prefill_ours": m["ours_prefill"],
                    "prefill_hf": m["hf_prefill"],
                    "prefill_ratio": m["ours_prefill"] / m["hf_prefill"],
                    "decode_ours": m["ours_decode"],
                    "decode_hf": m["hf_decode"],
                    "decode_ratio": m["ours_decode"] / m["hf_decode"],
                    "decode_GB_s": decode_gbs,
                    "hf_decode_GB_s": weight_bytes * m["hf_decode"] / 1e9,
                    "bandwidth_GB_s": m["bandwidth"],
                    "of_bandwidth": decode_gbs / m["bandwidth"],
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    path = save("model_speed", {"prompt": args.prompt, "decode": args.decode, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
