"""Before/after speed of two source trees of this package, alternated in one run: for a
refactor that must not cost speed (e.g. `git worktree add /tmp/base OLD_COMMIT`).

    python benchmarks/tree_ab.py /tmp/base/src src [--rounds 3] [--cases gguf:fp32,engine,...]

Each case runs in a fresh process per tree (PYTHONPATH puts that tree's `mistral_nemo`
first), trees alternating within each round; the table gives each side's median and the
ratio. Cases: gguf:{fp32,bf16,int8,int4} (the demo GGUF: 512-token prefill, 128-token
decode), engine (tiny preset: 16 concurrent requests and batch-1 through LLM.generate),
nemo2:{bf16,fp32} (real NeMo dims, 2 layers). Ours only: the peers do not change between
trees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = "gguf:fp32,gguf:bf16,gguf:int8,gguf:int4,engine,nemo2:bf16,nemo2:fp32"


def decode_rate(model, prompt, n=128):
    from mistral_nemo.generate import generate

    start, count = None, 0
    for _ in generate(model, prompt, n + 1, temperature=0, stop_ids=[]):
        if start is None:
            start = time.perf_counter()
        else:
            count += 1
    return count / (time.perf_counter() - start)


def measure(what: str) -> dict:
    """One case on whichever mistral_nemo is first on sys.path."""
    import torch
    from common import best_time

    from mistral_nemo import LLM, ModelConfig, SamplingParams, Transformer
    from mistral_nemo.checkpoint.random_init import init_random
    from mistral_nemo.demo import demo_model_path

    try:  # the tree before the runtime layer ran the model directly
        from mistral_nemo.runtime import ModelRunner
    except ImportError:
        ModelRunner = None

    def prefill_rate(model, tokens, repeats):
        forward = ModelRunner(model).logits if ModelRunner else model

        def prefill():
            with torch.inference_mode():
                forward(tokens, 0, model.new_cache(1, tokens.shape[1]), last_only=True)

        prefill()
        return tokens.shape[1] / best_time(prefill, repeats, warmup=0)

    out = {}
    kind, _, variant = what.partition(":")
    if kind == "gguf":
        settings = {
            "fp32": {"dtype": torch.float32},
            "bf16": {"dtype": torch.bfloat16},
            "int8": {"dtype": torch.float32, "quantize": "int8"},
            "int4": {"dtype": torch.float32, "quantize": "int4", "group_size": 32},
        }[variant]
        model = Transformer.from_pretrained(demo_model_path(), **settings)
        prompt = torch.randint(100, 40000, (512,), generator=torch.Generator().manual_seed(0))
        out["prefill_tok_s"] = prefill_rate(model, prompt[None], 3)
        out["decode_tok_s"] = max(decode_rate(model, prompt[:16].tolist()) for _ in range(3))
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "engine":
            init_random(Path(tmp), ModelConfig.preset("tiny"), "mistral", dtype=torch.float32)
            llm = LLM(Transformer.from_pretrained(tmp), None, kv_cache_memory="256MiB")
            g = torch.Generator().manual_seed(1)
            lengths = torch.randint(32, 256, (16,), generator=g).tolist()
            prompts = [torch.randint(1000, 131072, (n,), generator=g).tolist() for n in lengths]
            params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            llm.generate(prompts[:2], params)
            many = best_time(lambda: llm.generate(prompts, params), 3, warmup=0)
            one = best_time(lambda: llm.generate(prompts[:1], params), 3, warmup=0)
            out["engine16_tok_s"], out["engine1_tok_s"] = 16 * 128 / many, 128 / one
            return out
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[variant]
        config = ModelConfig.preset("nemo-12b").replace(n_layers=2)
        init_random(Path(tmp), config, "mistral", dtype=dtype)
        model = Transformer.from_pretrained(tmp)
        shutil.rmtree(tmp)  # 4-8 GB of disk; the weights are in memory now
        out["prefill_tok_s"] = prefill_rate(model, torch.randint(100, 40000, (1, 512)), 2)
        out["decode_tok_s"] = max(decode_rate(model, list(range(100, 116)), 32) for _ in range(3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", help="the src/ folder of the tree before")
    parser.add_argument("after", help="the src/ folder of the tree after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a child process's case
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    from common import save, table

    runs: dict[tuple[str, str], dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for case in args.cases.split(","):
            for side, src in (("before", args.before), ("after", args.after)):
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
                done = subprocess.run(
                    [sys.executable, __file__, "-", "-", "--measure", case],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                for metric, value in json.loads(done.stdout.splitlines()[-1]).items():
                    runs.setdefault((case, metric), {}).setdefault(side, []).append(value)
    rows = []
    for (case, metric), sides in runs.items():
        before, after = (statistics.median(sides[s]) for s in ("before", "after"))
        rows.append(
            {
                "case": f"{case} {metric}",
                "before": round(before, 1),
                "after": round(after, 1),
                "after/before": round(after / before, 3),
                "runs before": [round(x) for x in sides["before"]],
                "runs after": [round(x) for x in sides["after"]],
            }
        )
    print(table(rows, list(rows[0])))
    save("tree_ab", {"before": args.before, "after": args.after, "rows": rows})


if __name__ == "__main__":
    main()
