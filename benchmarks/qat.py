"""Does quantization-aware training matter? The perplexity gap between a quantized model and
its full-precision counterpart after post-training quantization (PTQ) and after a short
QAT fine-tune of the same step budget.

    python benchmarks/qat.py [--steps 40] [--batch 2] [--seq-len 512] [--lr 5e-5]
                             [--lr-here 2e-4] [--pretrain-steps 300] [--models here,demo]
                             [--schemes fp8,int4] [--seed 0]

(The figures in docs/distributed.md: `--models demo` at 40 steps, `--models here --steps
120`.) For each model (`HERE`, pre-trained from scratch here on the corpus; and the demo
model) the same fine-tune runs three times on the first 95% of the package corpus:
- plain (bf16 autocast over fp32): its full-precision perplexity is the reference, and
  `mistral-nemo quantize` of it is the PTQ model;
- with `qat=fp8` and with `qat=int4` (groups of 128, or the largest of 32/64 dividing a
  narrower layer): quantized the same way afterwards.
The model pre-trained here fine-tunes at its own (higher) learning rate, `--lr-here`.
Perplexity is `mistral-nemo eval perplexity`'s protocol on the held-out 5%.
gap = ppl(quantized) / ppl(reference) - 1: both quantized models are measured against the
same full-precision fine-tune (the QAT model's own unquantized perplexity is shown beside,
but it is not what QAT optimizes). Goals (the QAT issue): FP8 gap after QAT under
0.2%; int4 QAT closes at least half of the PTQ gap. Writes benchmarks/results/qat-MODELS.json
and .png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import RESULTS, save, table

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.checkpoint import open_checkpoint, quantize_checkpoint
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.perplexity import CORPUS, evaluate_perplexity
from mistral_nemo.quant import int4_group_size
from mistral_nemo.tokenizer import BaseTokenizer, load_tokenizer
from mistral_nemo.train.config import TrainConfig
from mistral_nemo.train.trainer import train

GROUP_SIZE = 128


def perplexity(path: Path, tokenizer: BaseTokenizer, text: str, ctx: int) -> float:
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    return evaluate_perplexity(model, tokenizer, text, ctx=ctx).ppl


def fine_tune(
    base: Path, out: Path, data: Path, lr: float, args: argparse.Namespace, **extra: object
) -> Path:
    config = TrainConfig(
        model=str(base),
        output_dir=str(out),
        data=[str(data)],
        seq_len=args.seq_len,
        batch_size=args.batch,
        steps=args.steps,
        lr=lr,
        warmup_steps=max(1, args.steps // 10),
        min_lr_ratio=1.0,
        weight_decay=0.0,
        precision="bf16",
        group_size=GROUP_SIZE,
        seed=args.seed,
        **extra,  # type: ignore[arg-type]
    )
    return train(config).output


# NeMo's vocabulary and shape family (GQA, head_dim != dim / heads) at a width where int4
# takes real groups of 128 and FP8's rounding is not lost in training noise, as it was for
# the 64-wide tiny preset.
HERE = ModelConfig(
    dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=768, vocab_size=131072
)


def pretrained_here(tmp: Path, data: Path, args: argparse.Namespace) -> Path:
    """`HERE` pre-trained from scratch on the training part of the corpus."""
    init_random(tmp / "init", HERE, "hf", seed=args.seed, dtype=torch.float32)
    config = TrainConfig(
        model=str(tmp / "init"),
        output_dir=str(tmp / "pretrain"),
        data=[str(data)],
        seq_len=256,
        batch_size=4,
        steps=args.pretrain_steps,
        lr=3e-3,
        warmup_steps=max(1, args.pretrain_steps // 10),
        precision="bf16",
        seed=args.seed,
    )
    return train(config).output


def compare(
    name: str, base: Path, tmp: Path, data: Path, held_out: str, args: argparse.Namespace
) -> list[dict[str, object]]:
    ctx = args.seq_len
    lr = args.lr_here if name == "here" else args.lr
    # The base's tokenizer: a checkpoint trained from a GGUF file has no tokenizer file.
    tokenizer = load_tokenizer(base)
    group = int4_group_size(open_checkpoint(base).config.dim, GROUP_SIZE)  # narrow models: less
    plain = fine_tune(base, tmp / f"{name}-plain", data, lr, args)
    reference = perplexity(plain, tokenizer, held_out, ctx)
    rows = []
    for scheme in args.schemes.split(","):
        quantize_checkpoint(plain, tmp / f"{name}-ptq-{scheme}", scheme, GROUP_SIZE)
        ptq = perplexity(tmp / f"{name}-ptq-{scheme}", tokenizer, held_out, ctx)
        qat = fine_tune(base, tmp / f"{name}-qat-{scheme}", data, lr, args, qat=scheme)
        qat_fp = perplexity(qat, tokenizer, held_out, ctx)
        quantize_checkpoint(qat, tmp / f"{name}-qat-{scheme}-q", scheme, GROUP_SIZE)
        qat_q = perplexity(tmp / f"{name}-qat-{scheme}-q", tokenizer, held_out, ctx)
        ptq_gap, qat_gap = ptq / reference - 1, qat_q / reference - 1
        rows.append(
            {
                "model": name,
                "scheme": scheme if scheme != "int4" else f"int4-g{group}",
                "ppl full precision": round(reference, 4),
                "ppl PTQ": round(ptq, 4),
                "ppl QAT quantized": round(qat_q, 4),
                "ppl QAT unquantized": round(qat_fp, 4),
                "PTQ gap %": round(100 * ptq_gap, 3),
                "QAT gap %": round(100 * qat_gap, 3),
                "gap closed %": round(100 * (1 - qat_gap / ptq_gap), 1) if ptq_gap else None,
                "QAT quantized vs unquantized %": round(100 * (qat_q / qat_fp - 1), 3),
            }
        )
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['scheme']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["PTQ gap %"] for r in rows], 0.4, label="PTQ")  # type: ignore[misc]
    ax.bar([i + 0.2 for i in x], [r["QAT gap %"] for r in rows], 0.4, label="QAT")  # type: ignore[misc]
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("perplexity gap to full precision (%)")
    ax.set_title("Quantized vs full precision after the same fine-tuning budget")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lr-here", type=float, default=2e-4)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--models", default="here,demo")
    parser.add_argument("--schemes", default="fp8,int4")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    args = parser.parse_args()

    text = CORPUS.read_text()
    cut = text.rfind("\n", 0, int(len(text) * 0.95))
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / "train.txt"
        data.write_text(text[:cut])
        for name in args.models.split(","):
            base = pretrained_here(tmp, data, args) if name == "here" else demo_model_path()
            rows += compare(name, base, tmp, data, text[cut:], args)
    print(table(rows, list(rows[0])))
    name = "qat-" + args.models.replace(",", "-") + (f"-seed{args.seed}" if args.seed else "")
    RESULTS.mkdir(exist_ok=True)
    plot(rows, RESULTS / f"{name}.png")
    save(name, {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
