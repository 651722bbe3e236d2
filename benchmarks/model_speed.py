"""Prefill and batch-1 decode speed: ours vs transformers' MistralForCausalLM, same checkpoint.

    python benchmarks/model_speed.py [--configs tiny,nemo-2layer] [--dtypes fp32,bf16]

Prefill: one forward over a 512-token prompt (LM head on the last position, as generate does).
Decode: greedy generation of 128 tokens after that prompt, timed as t(129 tokens) - t(1 token).
Decode GB/s counts the weight bytes read per token (all but the embedding table) and is set
against the read bandwidth measured in the same run, right after that row's timings.
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

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    # Real NeMo dims and vocabulary, 2 of the 40 layers: ~1.9 B parameters.
    "nemo-2layer": ModelConfig.preset("nemo-12b").replace(n_layers=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours_runner(path: Path, prompt: torch.Tensor):
    model = Transformer.from_pretrained(path)
    ids = prompt[0].tolist()

    def prefill() -> None:
        with torch.inference_mode():
            model(prompt, 0, model.new_cache(1, prompt.shape[1]), last_only=True)

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


def measure(runner, path: Path, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    prefill, gen = runner(path, prompt)
    t_prefill = best_time(prefill, repeats)
    t_one = best_time(lambda: gen(1), repeats)
    t_all = best_time(lambda: gen(decode + 1), max(1, repeats // 2))
    gc.collect()
    return {"prefill_tok_s": prompt.shape[1] / t_prefill, "decode_tok_s": decode / (t_all - t_one)}


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
            repeats = 5 if config.num_parameters() < 1e8 else 2
            prompt = torch.randint(1000, config.vocab_size, (1, args.prompt))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ckpt"
                init_random(path, config, "hf", seed=0, dtype=dtype)
                ours = measure(ours_runner, path, prompt, args.decode, repeats)
                theirs = measure(hf_runner, path, prompt, args.decode, repeats)
            # The machine's bandwidth varies with its neighbours' load: measure it next to
            # the decode it is compared with.
            bandwidth = read_bandwidth_gbs()
            decode_gbs = weight_bytes * ours["decode_tok_s"] / 1e9
            rows.append(
                {
                    "config": cname,
                    "dtype": dname,
                    "prefill_ours": ours["prefill_tok_s"],
                    "prefill_hf": theirs["prefill_tok_s"],
                    "prefill_ratio": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                    "decode_ours": ours["decode_tok_s"],
                    "decode_hf": theirs["decode_tok_s"],
                    "decode_ratio": ours["decode_tok_s"] / theirs["decode_tok_s"],
                    "decode_GB_s": decode_gbs,
                    "hf_decode_GB_s": weight_bytes * theirs["decode_tok_s"] / 1e9,
                    "bandwidth_GB_s": bandwidth,
                    "of_bandwidth": decode_gbs / bandwidth,
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    path = save("model_speed", {"prompt": args.prompt, "decode": args.decode, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
