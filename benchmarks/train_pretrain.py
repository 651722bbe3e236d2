"""Pre-training from scratch: a random NeMo-shaped model (GQA, head_dim != dim / heads, the
131k Tekken vocabulary) trained on the package's corpus until the loss clearly falls.

    python benchmarks/train_pretrain.py [--preset tiny] [--steps 200] [--seq-len 256]
                                        [--batch 8] [--lr 3e-3]

The corpus (`eval/data/corpus.txt`, Python's documentation) is split at a line: the first
95% is trained on (packed with EOS between documents, one document per blank-line-separated
module page), the last 5% is held out and scored with `mistral-nemo eval perplexity`'s
protocol before and after. Writes the loss curve to benchmarks/results/train_pretrain.png
and the figures to train_pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import RESULTS, save, table

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.eval.perplexity import CORPUS, evaluate_perplexity
from mistral_nemo.tokenizer import load_tokenizer
from mistral_nemo.train.config import TrainConfig
from mistral_nemo.train.metrics import read_log
from mistral_nemo.train.trainer import train


def held_out_perplexity(model_path: Path, text: str, ctx: int) -> float:
    model = Transformer.from_pretrained(model_path, dtype=torch.float32)
    return evaluate_perplexity(model, load_tokenizer(model_path), text, ctx=ctx).ppl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    text = CORPUS.read_text()
    cut = text.rfind("\n", 0, int(len(text) * 0.95))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "train.txt").write_text(text[:cut])
        init_random(tmp / "init", ModelConfig.preset(args.preset), "hf", dtype=torch.float32)
        config = TrainConfig(
            model=str(tmp / "init"),
            output_dir=str(tmp / "run"),
            data=[str(tmp / "train.txt")],
            seq_len=args.seq_len,
            batch_size=args.batch,
            steps=args.steps,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 10),
            weight_decay=0.1,
            precision="bf16",
            plot=True,
            layout="hf",
        )
        result = train(config)
        before = held_out_perplexity(tmp / "init", text[cut:], args.seq_len)
        after = held_out_perplexity(result.output, text[cut:], args.seq_len)
        log = read_log(tmp / "run" / "log.jsonl")
        shutil.copyfile(tmp / "run" / "loss.png", RESULTS / "train_pretrain.png")
    first = sum(r["loss"] for r in log[:10]) / len(log[:10])
    last = sum(r["loss"] for r in log[-10:]) / len(log[-10:])
    rows = [
        {
            "preset": args.preset,
            "steps": args.steps,
            "tokens/step": args.seq_len * args.batch,
            "loss first 10": round(first, 3),
            "loss last 10": round(last, 3),
            "held-out ppl before": round(before, 1),
            "held-out ppl after": round(after, 1),
            "tokens/s": round(sum(r["tokens_per_s"] for r in log) / len(log), 1),
            "peak MiB": round(max(r["peak_memory_mib"] for r in log)),
        }
    ]
    print(table(rows, list(rows[0])))
    save("train_pretrain", {"config": json.loads(json.dumps(vars(args))), "rows": rows})


if __name__ == "__main__":
    main()
