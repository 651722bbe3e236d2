"""Training speed and memory: ours vs transformers + peft vs torchtune, the same model, token
batches, sequence length, batch, precision and optimizer, in one run.

    python benchmarks/train_speed.py [--steps 8] [--seq-len 512] [--batch 4]
                                     [--cases lora,full] [--sides ours,transformers,torchtune]
                                     [--repeats 2] [--threads N]
                                     [--torchtune-python /tmp/tt/bin/python]

Model: the demo GGUF (SmolLM2-135M-Instruct), dequantized to fp32 weights. Cases: `lora`,
rank 16, alpha 32, no dropout, on the seven linear projections of every block (q, k, v, o,
gate, up, down); `full`, every weight. Every side trains with bf16 autocast over the forward
pass, the loss (summed token cross-entropy / trained tokens) in fp32, no activation
checkpointing, one optimizer step per micro-batch of --batch rows of --seq-len tokens: forward,
backward, clip to norm 1.0, our AdamW (`build_optimizer`: same groups, lr, betas, fused) for
all sides so that only the models differ, zero_grad, loss.item(). The batches are the first
--steps micro-batches that our `pretraining_data` packs from the package's corpus, tokenized
once by this process with our tokenizer (all sides' vocabularies are the same file).

- ours: `load_for_training` and `micro_batch_loss`, the step `train` runs.
- transformers: `AutoModelForCausalLM` from the same GGUF (its own dequantization), its
  default sdpa attention, use_cache=False; for LoRA, peft's `get_peft_model`. A plain
  PyTorch loop, the loss computed from the logits as ours is.
- torchtune 0.6.1: its `llama3_2` / `lora_llama3_2` builders in SmolLM2's shape (tied
  embeddings, plain RoPE: scale_factor 1), the weights from our loader through torchtune's
  `meta_to_tune` (our parameter names are Meta's); the loss is its recipes' default
  `CEWithChunkedOutputLoss` (8 chunks). Under autocast each chunk casts the fp32 tied head
  to bf16 anew, which costs its LoRA case, where that weight is frozen so autocast does not
  cache the cast (torchtune's recipes train in pure bf16 instead, not the setting compared
  here). It needs torchao, whose releases follow torch's: torchao 0.18 no longer has the
  `torchao.dtypes.nf4tensor` that torchtune 0.6.1 imports; 0.11.0 works with torch 2.13. It
  runs in a scratch venv that reuses our torch through a .pth line (a
  `--system-site-packages` venv would see the base interpreter's packages, not our venv's):

      python -m venv /tmp/tt
      echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
          > /tmp/tt/lib/python3.11/site-packages/main_venv.pth
      /tmp/tt/bin/pip install torchtune==0.6.1 torchao==0.11.0

  Without it (or if torchtune fails) its rows are skipped and the reason is printed and
  saved in the JSON under "skipped".

Each side and case runs in a fresh process. Speed: tokens/s = batch * seq_len over the median
step time of the steps after 2 warm-up steps. Memory, from the process's resident high-water
mark (VmHWM; on Linux ru_maxrss would also count the parent's peak, carried over exec): "load"
is the peak up to the first step (framework, weights, optimizer), "train" the peak during the
steps (the mark is reset in between, once the heap the loader freed is handed back to the
system), "peak" the larger. Sides alternate within each of --repeats rounds; each keeps its
best speed and lowest peaks. "loss 1" is the first step's loss (the same weights on the same
batch: the sides agree to bf16 rounding), "loss N" the last. Writes
benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import save, table
from torch import nn

from mistral_nemo import Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.perplexity import CORPUS
from mistral_nemo.tokenizer import load_tokenizer
from mistral_nemo.train.config import TrainConfig
from mistral_nemo.train.data import pretraining_data
from mistral_nemo.train.optim import build_optimizer
from mistral_nemo.train.packing import IGNORE, Batch
from mistral_nemo.train.trainer import load_for_training, micro_batch_loss

WARMUP_STEPS = 2
CASES: dict[str, dict[str, Any]] = {
    "lora": {"lora_rank": 16, "lora_alpha": 32.0},
    "full": {"lora_rank": 0},
}
# Our linear layers' names -> transformers' (LLaMA's) for peft's target_modules.
HF_LINEAR_NAMES = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w3": "up_proj",
    "w2": "down_proj",
}

LossFn = Callable[[Batch], torch.Tensor]  # -> summed token cross-entropy / trained tokens


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    summed = F.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return summed / batch.trained_tokens


def ours_side(config: TrainConfig) -> tuple[nn.Module, LossFn]:
    model = load_for_training(config)
    return model, lambda batch: micro_batch_loss(model, batch, config) / batch.trained_tokens


def transformers_side(config: TrainConfig) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForCausalLM

    path = Path(config.model)
    model: nn.Module = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=[HF_LINEAR_NAMES[t] for t in config.lora_targets],
        )
        model = get_peft_model(model, lora)
    model.train()

    def loss(batch: Batch) -> torch.Tensor:
        with bf16_autocast():
            logits = model(input_ids=batch.tokens, use_cache=False).logits
        return token_loss(logits, batch)

    return model, loss


def torchtune_side(config: TrainConfig) -> tuple[nn.Module, LossFn]:
    from torchtune.models.convert_weights import meta_to_tune
    from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    source = Transformer.from_pretrained(config.model, dtype=torch.float32)
    dims = source.config
    shape: dict[str, Any] = {
        "vocab_size": dims.vocab_size,
        "num_layers": dims.n_layers,
        "num_heads": dims.n_heads,
        "num_kv_heads": dims.n_kv_heads,
        "embed_dim": dims.dim,
        "intermediate_dim": dims.hidden_dim,
        "max_seq_len": dims.max_seq_len,
        "rope_base": dims.rope_theta,
        "norm_eps": dims.norm_eps,
        "scale_factor": 1,  # Llama 3's RoPE scaling with factor 1 is plain RoPE
        "tie_word_embeddings": dims.tie_embeddings,
    }
    if config.lora_rank:
        model = lora_llama3_2(  # the seven projections, as CASES' default lora_targets
            ["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            **shape,
        )
    else:
        model = llama3_2(**shape)
    state = meta_to_tune(source.state_dict())
    del source
    if dims.tie_embeddings:
        del state["output.weight"]  # the same tensor as the embedding's; torchtune ties it
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("lora" not in name for name in missing):
        raise ValueError(f"weights do not fit torchtune's model: {missing=} {unexpected=}")
    if config.lora_rank:
        set_trainable_params(model, get_adapter_params(model))
    ce = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(ce.num_output_chunks)
    model.train()

    def loss(batch: Batch) -> torch.Tensor:
        with bf16_autocast():
            logits = model(batch.tokens)
        return ce(logits, batch.labels)

    return model, loss


SIDES: dict[str, Callable[[TrainConfig], tuple[nn.Module, LossFn]]] = {
    "ours": ours_side,
    "transformers": transformers_side,
    "torchtune": torchtune_side,
}


def resident_peak_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_resident_peak() -> None:
    # Loaders free their transient copies, but glibc keeps much of that heap (300-500 MB
    # after torchtune's load here): hand it back first, so the training peak starts from
    # what the process holds, whatever each side's loader left behind.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One side and case in this (fresh) process: load, train, measure."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = TrainConfig(**spec["config"])
    data = torch.load(spec["batches"])
    batches = [Batch(*rows) for rows in zip(data["tokens"], data["labels"], strict=True)]
    model, loss_of = SIDES[spec["side"]](config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    load_peak = resident_peak_mib()
    gc.collect()
    reset_resident_peak()
    seconds, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[WARMUP_STEPS:])
    train_peak = resident_peak_mib()
    return {
        "trainable": sum(p.numel() for p in trainable),
        "tokens/s": batches[0].tokens.numel() / step_s,
        "step s": step_s,
        "load MiB": load_peak,
        "train MiB": train_peak,
        "peak MiB": max(load_peak, train_peak),
        "loss 1": losses[0],
        "loss N": losses[-1],
        "step_seconds": seconds,
        "losses": losses,
    }


class ChildFailed(RuntimeError):
    """A side's process exited with an error (its stderr is the message)."""


def run_child(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        raise ChildFailed(f"{spec['side']} {spec['case']}: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def torchtune_problem(python: str) -> str | None:
    """Why torchtune cannot run under `python`, or None."""
    if not Path(python).is_file():
        return f"{python}: no such interpreter (see the module docstring for the setup)"
    probe = subprocess.run(
        [python, "-c", "import torchtune, torchao"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"{python}: {probe.stderr.strip().splitlines()[-1]}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cases", default="lora,full")
    parser.add_argument("--sides", default="ours,transformers,torchtune")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--torchtune-python", default="/tmp/tt/bin/python")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    cases = args.cases.split(",")
    sides = args.sides.split(",")
    if unknown := sorted(set(cases) - set(CASES)) + sorted(set(sides) - set(SIDES)):
        parser.error(f"unknown case or side: {', '.join(unknown)}")

    path = demo_model_path()
    skipped: dict[str, str] = {}
    if "torchtune" in sides and (problem := torchtune_problem(args.torchtune_python)):
        skipped["torchtune"] = problem
        sides.remove("torchtune")
    python = {side: sys.executable for side in sides} | {"torchtune": args.torchtune_python}

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = pretraining_data(
            [CORPUS], load_tokenizer(path), args.seq_len, args.batch, cache_dir=Path(tmp)
        )
        stream = data.batches()
        taken = [next(stream) for _ in range(args.steps)]
        batches = Path(tmp) / "batches.pt"
        torch.save(
            {
                "tokens": torch.stack([b.tokens for b in taken]),
                "labels": torch.stack([b.labels for b in taken]),
            },
            batches,
        )
        for _ in range(args.repeats):
            for case in cases:
                for side in list(sides):
                    spec: dict[str, Any] = {
                        "side": side,
                        "case": case,
                        "config": {
                            "model": str(path),
                            "seq_len": args.seq_len,
                            "batch_size": args.batch,
                            **CASES[case],
                        },
                        "batches": str(batches),
                        "threads": args.threads,
                    }
                    try:
                        result = run_child(python[side], spec)
                    except ChildFailed as e:
                        if side != "torchtune":
                            raise
                        skipped[side] = str(e)
                        sides.remove(side)
                        continue
                    print(f"{case} {side}: {result['tokens/s']:.0f} tokens/s", flush=True)
                    runs.setdefault((case, side), []).append(result)

    rows = []
    for (case, side), results in runs.items():
        if side not in sides:
            continue
        # The fastest run's figures, and the lowest peaks of all runs.
        low = {key: min(r[key] for r in results) for key in ("load MiB", "train MiB", "peak MiB")}
        rows.append(
            {"case": case, "side": side, **max(results, key=lambda r: r["tokens/s"]), **low}
        )
    ratios = []
    for mine in (r for r in rows if r["side"] == "ours"):
        for peer in (r for r in rows if r["case"] == mine["case"] and r["side"] != "ours"):
            ratios.append(
                {
                    "case": mine["case"],
                    "ours vs": peer["side"],
                    "speed x": mine["tokens/s"] / peer["tokens/s"],
                    "train MiB x": mine["train MiB"] / peer["train MiB"],
                    "peak MiB x": mine["peak MiB"] / peer["peak MiB"],
                }
            )

    print(
        f"\n{path.name}, {args.steps} steps ({WARMUP_STEPS} warm-up) of {args.batch} x "
        f"{args.seq_len} tokens, bf16 autocast, {args.threads} threads, best of {args.repeats}"
    )
    columns = ["case", "side", "trainable", "loss 1", "loss N", "tokens/s", "step s"]
    print(table(rows, [*columns, "load MiB", "train MiB", "peak MiB"]))
    if ratios:
        print()
        print(table(ratios, list(ratios[0])))
    for side, reason in skipped.items():
        print(f"skipped {side}: {reason}")
    out = save(
        "train_speed",
        {
            "model": path.name,
            "steps": args.steps,
            "warmup_steps": WARMUP_STEPS,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "rows": rows,
            "ratios": ratios,
            "skipped": skipped,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
