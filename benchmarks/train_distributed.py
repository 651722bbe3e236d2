"""Training throughput of 1 process vs 2 (FSDP2; tensor parallel), what communication
costs, and the planner's memory figure beside the measured peak.

    python benchmarks/train_distributed.py [--steps 8] [--seq-len 512] [--model PATH]

Every run trains the same global batch (4 sequences of --seq-len tokens a step, bf16
autocast) with `mistral-nemo train`: one process with both cores, or two (torchrun, gloo)
with one core each. The model is random, of NeMo's shape family at 0.16 B parameters
(GQA 8/2 heads of 128, a 131k vocabulary) since the demo model's 9 heads do not split in
two; --model PATH trains another (tensor parallel only where its heads split).
Throughput is the mean of the steps after the first two. Communication: the bytes FSDP2
moves a step (parameters gathered for forward and again for backward in bf16, gradients
reduce-scattered in fp32) and what gloo takes to move them, timed alone in the same two
processes. Memory: the main process's peak resident set beside `planner.plan_training` for
the run (which counts tensors only: the measured peak adds the Python runtime and
libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import save, table

from mistral_nemo import ModelConfig
from mistral_nemo.checkpoint import open_checkpoint
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.eval.perplexity import CORPUS
from mistral_nemo.planner import plan_training

# NeMo's shape family, small: GQA 4:1, head_dim 128 (not dim / heads), the 131k vocabulary.
BENCH = ModelConfig(
    dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=1536,
    vocab_size=131072, rope_theta=1e6, norm_eps=1e-5,
)  # fmt: skip
RUNS = {  # name: (processes, settings)
    "1 process": (1, {"batch_size": 2, "grad_accum": 2}),
    "FSDP2 x2": (2, {"batch_size": 2, "grad_accum": 1}),
    "TP x2": (2, {"batch_size": 2, "grad_accum": 2, "tp": 2}),
    "TP x2 + SP": (2, {"batch_size": 2, "grad_accum": 2, "tp": 2, "sequence_parallel": True}),
}


def launch(processes: int, args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, "-m", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", "-m", *args]  # fmt: skip
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def train_run(name: str, model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    processes, extra = RUNS[name]
    settings = {
        "model": str(model),
        "output_dir": str(out),
        "data": [str(data)],
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup_steps": 1,
        "precision": "bf16",
        "cache_dir": str(out.parent / "cache"),
        **extra,
    }
    cli = ["mistral_nemo.train", *(f"{k}={json.dumps(v)}" for k, v in settings.items())]
    launch(processes, cli, threads=2 // processes)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    timed = log[2:]
    config = open_checkpoint(model).config
    dp, tp = processes // extra.get("tp", 1), extra.get("tp", 1)
    plan = plan_training(config, args.seq_len, extra["batch_size"], dp, tp,
                         sequence_parallel=bool(extra.get("sequence_parallel")))  # fmt: skip
    return {
        "run": name,
        "tokens/s": round(sum(r["tokens_per_s"] for r in timed) / len(timed), 1),
        "peak MiB (main process)": round(max(r["peak_memory_mib"] for r in log)),
        "planned MiB": round(plan.total / 2**20),
        "loss at the end": round(log[-1]["loss"], 4),
    }


def probe_communication(model: Path) -> None:
    """In each of 2 processes: time FSDP2's collectives for this model's parameters."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    params = open_checkpoint(model).config.num_parameters()
    shard = params // 2
    bf16 = torch.zeros(shard, dtype=torch.bfloat16)
    gathered = torch.empty(2 * shard, dtype=torch.bfloat16)
    scattered = torch.empty(shard)
    full = torch.zeros(2 * shard)

    def step() -> None:
        dist.all_gather_into_tensor(gathered, bf16)  # forward
        dist.all_gather_into_tensor(gathered, bf16)  # backward
        dist.reduce_scatter_tensor(scattered, full)  # gradients

    step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(3):
        step()
    seconds = (time.perf_counter() - start) / 3
    if dist.get_rank() == 0:
        moved = 2 * (2 * shard * 2) + 2 * shard * 4  # bytes through each process a step
        print(json.dumps({"seconds": seconds, "bytes": moved}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_communication(args.model)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model or tmp / "model"
        if args.model is None:
            init_random(model, BENCH, "hf", dtype=torch.float32)
        config = open_checkpoint(model).config
        data = tmp / "train.txt"
        data.write_text(CORPUS.read_text())
        for name, (_, settings) in RUNS.items():
            if settings.get("tp") and (config.n_heads % 2 or config.n_kv_heads % 2):
                print(f"{name}: skipped, the model's heads do not split in two")
                continue
            rows.append(train_run(name, model, data, tmp / name.replace(" ", "_"), args))
            print(table(rows[-1:], list(rows[-1])), flush=True)
        probe = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             __file__, "--probe", "--model", str(model)],
            check=True, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    comm = json.loads(probe.stdout.strip().splitlines()[-1])
    base = rows[0]["tokens/s"]
    for row in rows:
        row["vs 1 process"] = round(row["tokens/s"] / base, 2)
    fsdp = next(r for r in rows if r["run"] == "FSDP2 x2")
    step_s = 4 * args.seq_len / fsdp["tokens/s"]
    print(table(rows, list(rows[0])))
    print(
        f"FSDP2 moves {comm['bytes'] / 2**20:.0f} MiB per process a step; gloo takes "
        f"{comm['seconds']:.2f} s for it alone ({100 * comm['seconds'] / step_s:.0f}% of the "
        f"{step_s:.2f} s step)"
    )
    save("train_distributed", {"config": {k: str(v) for k, v in vars(args).items()},
                               "rows": rows, "communication": comm})  # fmt: skip


if __name__ == "__main__":
    main()
