"""Peak memory of loading a >= 1 GB checkpoint, against the size of its weights.

    python benchmarks/load_memory.py [--layers 2]

Writes a NeMo-shaped checkpoint (real dims and vocabulary, `--layers` layers; 2 layers is
~1.9 B parameters, 3.8 GB in bf16) in both layouts, then loads it in a fresh process per
case, reads every weight and runs one forward pass, and reports peak RSS growth (VmHWM,
reset after warm-up, minus the RSS before loading) over the weights' size in the target
dtype. The goal is at
most 1.3x; loading bf16 as bf16 must not make an fp32 (or any second) copy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint import convert_checkpoint
from mistral_nemo.checkpoint.random_init import init_random

CHILD = textwrap.dedent("""
    import sys, time, psutil, torch
    from mistral_nemo import ModelConfig, Transformer
    with torch.device("meta"):  # torch's one-time meta-device setup, not part of the load
        Transformer(ModelConfig.preset("tiny"))
    before = psutil.Process().memory_info().rss
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2]]
    model = Transformer.from_pretrained(sys.argv[1], dtype=dtype)
    seconds = time.perf_counter() - start
    for p in model.parameters():
        p.max()  # read every page
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4]]))
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    peak = int(hwm.split()[1]) * 1024
    print(peak - before, seconds)
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    config = ModelConfig.preset("nemo-12b").replace(n_layers=args.layers)
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        hf, mistral = Path(tmp) / "hf", Path(tmp) / "mistral"
        init_random(hf, config, "hf", dtype=torch.bfloat16, progress=True)
        convert_checkpoint(hf, mistral, "mistral", progress=True)
        for layout, path in (("hf", hf), ("mistral", mistral)):
            for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), dtype],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                grown, seconds = out.stdout.split()
                weights = config.num_parameters() * itemsize
                rows.append(
                    {
                        "file": f"{layout} bf16",
                        "load_as": dtype,
                        "weights_GB": weights / 1e9,
                        "peak_growth_GB": int(grown) / 1e9,
                        "ratio": int(grown) / weights,
                        "load_s": float(seconds),
                    }
                )
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))
    print(f"wrote {save('load_memory', {'layers': args.layers, 'rows': rows})}")


if __name__ == "__main__":
    main()
