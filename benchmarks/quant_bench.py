"""Quantization: quality and speed of each scheme against bf16, one run.

    python benchmarks/quant_bench.py [--tokens 2048] [--decode 32]

On a NeMo-shaped checkpoint (real dims and vocabulary, 2 layers, ~1.9 B parameters) whose
weights are heavy-tailed the way trained weights are (per-row scales drawn log-normally, and
0.1% of entries ten times larger), each scheme is loaded in a fresh process and measured:
- quality: KL(bf16 || scheme) of the next-token distributions and top-1 agreement over
  `--tokens` positions of random text;
- size: bytes of weights in memory, the quantized checkpoint on disk (quantize CLI);
- memory: resident memory of the process after the quality run (RSS);
- speed: batch-1 decode tokens/s, all schemes in one process, measured alternately.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from functools import partial
from pathlib import Path

import torch
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint import layouts, quantize_checkpoint, write_checkpoint
from mistral_nemo.checkpoint.safetensors_io import TensorSource

SCHEMES = ["bf16", "fp8", "fp8-channel", "int8", "int4"]

# Decode speed of every scheme, measured in one process, alternating between them, so that
# all see the same machine (its bandwidth drifts with the neighbours' load).
SPEED = textwrap.dedent("""
    import json, sys, time, torch
    from mistral_nemo import Transformer
    from mistral_nemo.generate import generate
    path, n, schemes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    models = {s: Transformer.from_pretrained(path, quantize=None if s == "bf16" else s)
              for s in schemes}
    prompt = list(range(1000, 1016))
    def rate(model):  # first token to last: the prefill's variation stays out
        for i, _ in enumerate(generate(model, prompt, n + 1, temperature=0, stop_ids=[])):
            if i == 0:
                start = time.perf_counter()
        return n / (time.perf_counter() - start)
    best = dict.fromkeys(models, 0.0)
    for model in models.values():
        rate(model)
    for _ in range(3):
        for s, model in models.items():
            best[s] = max(best[s], rate(model))
    print(json.dumps(best))
""")

CHILD = textwrap.dedent("""
    import json, sys, time, psutil, torch
    import torch.nn.functional as F
    from mistral_nemo import Transformer
    path, scheme, tokens_file, ref_file = sys.argv[1:5]
    model = Transformer.from_pretrained(path, quantize=None if scheme == "bf16" else scheme)
    tokens = torch.load(tokens_file)
    with torch.inference_mode():
        logits = torch.cat([model(row[None]).float() for row in tokens]).flatten(0, 1)
    result = {"scheme": scheme}
    if scheme == "bf16":
        torch.save(logits, ref_file)
    else:
        ref = torch.load(ref_file)
        kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                      reduction="batchmean")
        result["kl"] = float(kl)
        result["top1"] = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    # (fused q/k/v and gate/up layers are views of the separate ones: counted once)
    result["weights_GB"] = sum(t.numel() * t.element_size()
                               for n, t in model.state_dict().items()
                               if ".wqkv." not in n and ".w13." not in n) / 1e9
    result["rss_GB"] = psutil.Process().memory_info().rss / 1e9
    print(json.dumps(result))
""")


def heavy_tailed(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return (torch.rand(shape, generator=generator) + 0.5).bfloat16()
    std = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
    out = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], 4096):
        rows = min(4096, shape[0] - start)
        w = torch.randn((rows, shape[1]), generator=generator)
        w *= torch.exp(0.5 * torch.randn((rows, 1), generator=generator))  # per-row scales
        outliers = torch.rand((rows, shape[1]), generator=generator) < 1e-3
        w[outliers] *= 10
        out[start : start + rows] = w * std
    return out


def write_heavy_tailed(path: Path, config: ModelConfig) -> None:
    def produce(i: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return heavy_tailed(name, shape, torch.Generator().manual_seed(i))

    sources = {
        name: TensorSource(shape, torch.bfloat16, partial(produce, i, name, shape))
        for i, (name, shape) in enumerate(layouts.expected_shapes(config).items())
    }
    write_checkpoint(path, config, "hf", sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    config = ModelConfig.preset("nemo-12b").replace(n_layers=2)
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        path = Path(tmp) / "bf16"
        write_heavy_tailed(path, config)
        tokens = torch.randint(
            1000,
            config.vocab_size,
            (args.tokens // 512, 512),
            generator=torch.Generator().manual_seed(0),
        )
        torch.save(tokens, Path(tmp) / "tokens.pt")
        for scheme in SCHEMES:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(path),
                    scheme,
                    str(Path(tmp) / "tokens.pt"),
                    str(Path(tmp) / "ref.pt"),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise SystemExit(f"{scheme} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if scheme == "bf16":
                disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            else:
                qpath = Path(tmp) / scheme
                quantize_checkpoint(path, qpath, scheme)
                disk = sum(f.stat().st_size for f in qpath.glob("*.safetensors"))
                shutil.rmtree(qpath)
            row["disk_GB"] = disk / 1e9
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)
        out = subprocess.run(
            [sys.executable, "-c", SPEED, str(path), str(args.decode), ",".join(SCHEMES)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"speed run failed:\n{out.stderr[-2000:]}")
        speed = json.loads(out.stdout.strip().splitlines()[-1])
    for row in rows:
        row["decode_tok_s"] = speed[row["scheme"]]
        row["decode_vs_bf16"] = speed[row["scheme"]] / speed["bf16"]
    columns = [
        "scheme",
        "kl",
        "top1",
        "weights_GB",
        "disk_GB",
        "rss_GB",
        "decode_tok_s",
        "decode_vs_bf16",
    ]
    print()
    print(table(rows, columns))
    print(f"wrote {save('quant_bench', {'tokens': args.tokens, 'rows': rows})}")


if __name__ == "__main__":
    main()
