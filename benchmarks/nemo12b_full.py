"""The full-size Mistral NeMo 12B on this machine: quantized on load, generating.

    python benchmarks/nemo12b_full.py [--schemes int8,fp8] [--dir ~/nemo12b-random]

Writes a full-shape NeMo 12B checkpoint with random bf16 weights in the Hugging Face
sharded layout (about 24.5 GB), then, in a fresh process per scheme, loads it quantized
tensor by tensor, generates 16 tokens, and reports peak RSS, load time and tokens/s against
the memory-bandwidth limit (bytes of weights read per token / bandwidth). Deletes the
checkpoint at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint.random_init import init_random

CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    from mistral_nemo import Transformer
    from mistral_nemo.generate import generate
    start = time.perf_counter()
    model = Transformer.from_pretrained(sys.argv[1], quantize=sys.argv[2], progress=True)
    load = time.perf_counter() - start
    prompt = [1, 1784, 3937, 1307, 5498, 1395, 1032, 1044]
    tokens = []
    for token in generate(model, prompt, 17, temperature=0, stop_ids=[]):
        if not tokens:  # decode from the first token to the last: the prefill stays out
            first = time.perf_counter()
        tokens.append(token)
    per_token = (time.perf_counter() - first) / 16
    # Bytes read per decoded token: every weight but the embedding table (one row of it).
    # (Fused q/k/v and gate/up layers are views of the separate ones: counted once.)
    read = sum(b.numel() * b.element_size() for n, b in model.state_dict().items()
               if n != "tok_embeddings.weight" and ".wqkv." not in n and ".w13." not in n)
    buf = torch.ones(2**28)
    s = time.perf_counter(); buf.sum(); bandwidth = 2**30 / (time.perf_counter() - s)
    print(json.dumps({"scheme": sys.argv[2], "load_s": load, "tok_s": 1 / per_token,
                      "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "bytes_per_token_GB": read / 1e9,
                      "bandwidth_GB_s": bandwidth / 1e9,
                      "of_bandwidth_limit": read / per_token / bandwidth,
                      "tokens": tokens[1:]}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemes", default="int8,fp8")
    parser.add_argument("--dir", default=str(Path.home() / "nemo12b-random"))
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoint")
    args = parser.parse_args()
    path = Path(args.dir)
    config = ModelConfig.preset("nemo-12b")
    rows = []
    try:
        if not path.exists():
            start = time.perf_counter()
            init_random(path, config, "hf", seed=0, dtype=torch.bfloat16, progress=True)
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 1e9:.1f} GB in {len(list(path.glob('*.safetensors')))} shards",
            file=sys.stderr,
        )
        for scheme in args.schemes.split(","):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), scheme], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(f"{scheme} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["checkpoint_GB"] = size / 1e9
            rows.append(row)
            print(
                table(
                    [{k: v for k, v in row.items() if k != "tokens"}],
                    [k for k in row if k != "tokens"],
                ),
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    print(f"wrote {save('nemo12b_full', {'rows': rows})}")


if __name__ == "__main__":
    main()
