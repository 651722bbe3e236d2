"""Serving throughput and latency: our engine vs transformers' batched `generate`, one run.

    python benchmarks/engine_speed.py [--concurrency 16,64] [--output 128] [--dtype fp32]
                                      [--repeats 3]

On a random `tiny` checkpoint (dim 64, 131k vocabulary: the LM head's [n, 64] x [64, 131072]
product is half of a decode step, and the engine's overhead most of the rest):
- batch-1 decode tokens/s: the engine vs the plain generation loop (mistral_nemo.generate);
- aggregate generated tokens/s with N concurrent requests (prompt lengths uniform in
  32..1024, `--output` tokens each, EOS ignored): the engine (continuous batching) vs
  transformers `generate` on the same N prompts, left-padded into one static batch;
- time to first token and inter-token latency percentiles of the engine's requests.

Each concurrency runs `--repeats` times, ours and theirs alternated, on fresh prompts each
time (the same for both; none shares a prefix with another), and keeps each side's best run:
this machine's speed drifts with its neighbours by up to 2x within a minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import best_time, save, table
from transformers import MistralForCausalLM

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.generate import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 1025, (n,), generator=g).tolist()
    return [torch.randint(1000, 131072, (k,), generator=g).tolist() for k in lengths]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def engine_run(llm: LLM, prompts: list[list[int]], output: int) -> dict[str, float]:
    """All requests arrive at once; returns throughput and latency figures in ms."""
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    engine = llm.engine
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    last_seen = {i: start for i in ids}
    counts = dict.fromkeys(ids, 0)
    ttft, itl = [], []
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            if n > counts[out.request_id]:
                (ttft if counts[out.request_id] == 0 else itl).append(
                    now - last_seen[out.request_id]
                )
                counts[out.request_id], last_seen[out.request_id] = n, now
    elapsed = time.perf_counter() - start
    return {
        "tok_s": sum(counts.values()) / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * percentile(itl, 0.5),
        "itl_p99_ms": 1e3 * percentile(itl, 0.99),
    }


def hf_run(model: MistralForCausalLM, prompts: list[list[int]], output: int) -> float:
    """Static batching: all prompts left-padded into one batch. Returns generated tokens/s."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=output,
            min_new_tokens=output,
            do_sample=False,
            pad_token_id=0,
        )
    return len(prompts) * output / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        init_random(path, ModelConfig.preset("tiny"), "hf", seed=0, dtype=dtype)
        model = Transformer.from_pretrained(path)
        llm = LLM(model, kv_cache_memory="2GiB", max_num_seqs=64)
        hf = MistralForCausalLM.from_pretrained(path, dtype=dtype).eval()

        prompt = make_prompts(1, 0)[0][:128]
        params = SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)

        def loop() -> None:
            list(generate(model, prompt, args.output, temperature=0, stop_ids=[]))

        t_loop = best_time(loop, 3)
        t_engine = best_time(lambda: llm.generate([prompt], params), 3)
        rows.append(
            {
                "case": "batch-1 decode",
                "ours_tok_s": args.output / t_engine,
                "peer": "plain generate loop",
                "peer_tok_s": args.output / t_loop,
                "ratio": t_loop / t_engine,
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
        for n in (int(c) for c in args.concurrency.split(",")):
            runs = []
            for repeat in range(args.repeats):
                prompts = make_prompts(n, 1000 * n + repeat)
                runs.append(
                    (engine_run(llm, prompts, args.output), hf_run(hf, prompts, args.output))
                )
            ours = max((r[0] for r in runs), key=lambda r: r["tok_s"])
            theirs = max(r[1] for r in runs)
            rows.append(
                {
                    "case": f"{n} concurrent",
                    "ours_tok_s": ours["tok_s"],
                    "peer": "transformers static batch",
                    "peer_tok_s": theirs,
                    "ratio": ours["tok_s"] / theirs,
                    **{k: v for k, v in ours.items() if k != "tok_s"},
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    columns = [
        "case",
        "ours_tok_s",
        "peer",
        "peer_tok_s",
        "ratio",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
    ]
    print(table(rows, columns))
    print("(latencies: all requests arrive at once; TTFT includes queueing behind the others)")
    print(
        f"wrote {save('engine_speed', {'dtype': args.dtype, 'output': args.output, 'rows': rows})}"
    )


if __name__ == "__main__":
    main()
