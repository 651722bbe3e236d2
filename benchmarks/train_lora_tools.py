"""LoRA fine-tuning of a real model for tool calling: the demo model (SmolLM2-135M-Instruct)
on the project's tool-calling conversations, scored on the held-out ones before and after.

    python benchmarks/train_lora_tools.py [--steps 100] [--rank 16] [--lr 1e-3]
                                          [--batch 1] [--seq-len 2048]

Data: benchmarks/data/tool_calls_{train,heldout}.jsonl (make_tool_data.py: 12 tools, 240
training and 60 held-out conversations, held-out phrasings and values unseen in training).
The demo model's chat template (ChatML) has no tools, so both splits go through
`eval.tool_calls.to_text_tools`: tools in the system prompt, calls as `<tool_call>` text, as
SmolLM2 learned function calling. SFT trains the assistant turns only (`train.sft`). Scored
by `eval.tool_calls.score_tool_calls`: the share of held-out items fully correct (the right
functions with arguments that parse, validate against the schemas and equal the expected
ones; no call where none is expected), with the partial rates beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import RESULTS, save, table

from mistral_nemo import LLM
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.tool_calls import load_conversations, score_tool_calls, to_text_tools
from mistral_nemo.tokenizer import load_tokenizer
from mistral_nemo.train.config import TrainConfig
from mistral_nemo.train.lora import load_merged
from mistral_nemo.train.metrics import read_log
from mistral_nemo.train.trainer import train

DATA = Path(__file__).resolve().parent / "data"
RATES = (
    "accuracy",
    "call_rate",
    "name_accuracy",
    "schema_valid_rate",
    "arguments_accuracy",
    "no_call_accuracy",
)


def score(model: object, heldout: list[dict]) -> dict:
    llm = LLM(model, load_tokenizer(demo_model_path()))
    result = score_tool_calls(llm, heldout, "text", max_tokens=160)
    return {key: result[key] for key in RATES}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    heldout = load_conversations(DATA / "tool_calls_heldout.jsonl")
    before = score(demo_model_path(), heldout)
    print("before:", before, flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        train_file = tmp / "train.jsonl"
        with train_file.open("w") as f:
            for conversation in load_conversations(DATA / "tool_calls_train.jsonl"):
                f.write(json.dumps(to_text_tools(conversation)) + "\n")
        config = TrainConfig(
            model=str(demo_model_path()),
            output_dir=str(tmp / "run"),
            data=[str(train_file)],
            data_format="chat",
            seq_len=args.seq_len,
            batch_size=args.batch,
            steps=args.steps,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 20),
            weight_decay=0.0,
            lora_rank=args.rank,
            lora_alpha=2.0 * args.rank,
            precision="bf16",
            plot=True,
        )
        result = train(config)
        log = read_log(tmp / "run" / "log.jsonl")
        (RESULTS / "train_lora_tools.png").write_bytes((tmp / "run" / "loss.png").read_bytes())
        after = score(load_merged(demo_model_path(), result.output, dtype=torch.float32), heldout)
    rows = [{"model": "demo, as shipped", **before}, {"model": f"+ LoRA r{args.rank}", **after}]
    print(table(rows, list(rows[0])))
    training = {
        "loss first 10": sum(r["loss"] for r in log[:10]) / len(log[:10]),
        "loss last 10": sum(r["loss"] for r in log[-10:]) / len(log[-10:]),
        "trained tokens/s": sum(r["tokens_per_s"] for r in log) / len(log),
        "peak MiB": max(r["peak_memory_mib"] for r in log),
    }
    print(training)
    save("train_lora_tools", {"args": vars(args), "rows": rows, "training": training})


if __name__ == "__main__":
    main()
