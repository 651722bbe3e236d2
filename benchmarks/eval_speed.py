"""Perplexity throughput (tokens scored per second): ours vs llama.cpp vs transformers, the
same protocol (llama.cpp's: chunks of --ctx from an empty cache, their second halves scored)
on the same tokens of the package's corpus, same thread count.

    python benchmarks/eval_speed.py [--ctx 512] [--chunks 8 | --all] [--threads 2]
                                    [--batch 1,4,8] [--repeats 2] [--llama-f32]

Model: the demo GGUF (SmolLM2-135M-Instruct, Q4_1). Ours loads it dequantized to fp32 (as
transformers does) and runs `evaluate_perplexity` with each --batch (chunks per forward).
llama.cpp runs the Q4_1 file natively as `llama-perplexity -c CTX -b CTX` does: one chunk per
decode, logits requested for the scored positions alone, its default f16 KV cache.
transformers runs the same [batch, ctx] forwards with `logits_to_keep`. Each prints its
perplexity too: ours and transformers' agree to 4+ digits, llama.cpp's differs by its
8-bit rounding of activations, which `--llama-f32` takes out (llama.cpp on a float32 copy,
float32 KV cache). Best of --repeats runs, alternating. `--all --repeats 1 --llama-f32`
gives the three perplexities of the whole corpus.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import save, table

from mistral_nemo import Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.eval.perplexity import CORPUS, evaluate_perplexity
from mistral_nemo.tokenizer import load_tokenizer
from tests.llama_cpp_oracle import float32_copy, load_llama

Run = Callable[[], tuple[float, float]]  # -> (perplexity, seconds)


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return log_z - logits[np.arange(len(targets)), targets]


def llama_cpp_run(
    path: Path, tokens: list[int], ctx: int, n_chunks: int, threads: int, **kv: int
) -> Run:
    """llama-perplexity's loop through llama.cpp's C API: per chunk, clear the memory,
    decode ctx tokens with logits for positions ctx/2.. only, score them."""
    import llama_cpp

    ll = load_llama(path, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads, **kv)
    n_vocab, first = ll.n_vocab(), ctx // 2
    batch = llama_cpp.llama_batch_init(ctx, 0, 1)

    def run() -> tuple[float, float]:
        context = ll._ctx.ctx  # (the closure keeps `ll`, which owns the context, alive)
        nll = []
        start = time.perf_counter()
        for i in range(n_chunks):
            chunk = tokens[i * ctx : (i + 1) * ctx]
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
            batch.n_tokens = ctx
            for k, token in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, k, 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = k >= first
            if llama_cpp.llama_decode(context, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits(context), shape=(ctx - first, n_vocab)
            )
            nll.append(chunk_nll(logits[:-1], np.array(chunk[first + 1 :])))
        seconds = time.perf_counter() - start
        return math.exp(np.concatenate(nll).mean()), seconds

    return run


def transformers_run(path: Path, tokens: list[int], ctx: int, n_chunks: int, batch: int) -> Run:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    first = ctx // 2
    stream = torch.tensor(tokens[: n_chunks * ctx]).view(n_chunks, ctx)

    @torch.inference_mode()
    def run() -> tuple[float, float]:
        nll = []
        start = time.perf_counter()
        for rows in stream.split(batch):
            logits = hf(rows, logits_to_keep=ctx - first).logits[:, :-1].float()
            targets = rows[:, first + 1 :]
            lse = torch.logsumexp(logits, dim=-1)
            nll.append((lse - logits.gather(2, targets[..., None]).squeeze(2)).double().flatten())
        seconds = time.perf_counter() - start
        return math.exp(torch.cat(nll).mean().item()), seconds

    return run


def ours_run(path: Path, text: str, ctx: int, n_chunks: int, batch: int) -> Run:
    model = Transformer.from_pretrained(path)
    tokenizer = load_tokenizer(path)

    def run() -> tuple[float, float]:
        result = evaluate_perplexity(model, tokenizer, text, ctx, batch, chunks=n_chunks)
        return result.ppl, result.seconds

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--all", action="store_true", help="the whole corpus")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", default="1,4,8", help="chunks per forward: ours, transformers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--llama-f32",
        action="store_true",
        help="also run llama.cpp on a float32 copy with a float32 KV cache (no 8-bit "
        "activations): its perplexity is then ours to 4+ digits",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = demo_model_path()
    text = CORPUS.read_text(encoding="utf-8")
    tokens = load_tokenizer(path).encode(text, bos=True)
    n_chunks = len(tokens) // args.ctx if args.all else args.chunks
    scored = n_chunks * (args.ctx - 1 - args.ctx // 2)
    batches = [int(b) for b in args.batch.split(",")]

    runs: dict[str, Run] = {
        "llama.cpp": llama_cpp_run(path, tokens, args.ctx, n_chunks, args.threads)
    }
    scratch = tempfile.TemporaryDirectory()
    if args.llama_f32:
        f32 = float32_copy(path, Path(scratch.name) / "f32.gguf")
        runs["llama.cpp f32"] = llama_cpp_run(
            f32, tokens, args.ctx, n_chunks, args.threads, type_k=0, type_v=0
        )
    for b in batches:
        runs[f"ours b{b}"] = ours_run(path, text, args.ctx, n_chunks, b)
        runs[f"transformers b{b}"] = transformers_run(path, tokens, args.ctx, n_chunks, b)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            ppl, seconds = run()
            if name not in best or seconds < best[name][1]:
                best[name] = (ppl, seconds)

    rows = [
        {"run": name, "ppl": ppl, "seconds": s, "tokens/s": scored / s}
        for name, (ppl, s) in best.items()
    ]
    llama_rate = scored / best["llama.cpp"][1]
    for row in rows:
        row["vs llama.cpp"] = row["tokens/s"] / llama_rate
        name = str(row["run"])
        if name.startswith("ours"):
            peer = best[name.replace("ours", "transformers")][1]
            row["vs transformers"] = peer / float(row["seconds"])
    print(
        f"demo GGUF, {n_chunks} chunks of {args.ctx} ({scored} tokens scored), "
        f"{args.threads} threads"
    )
    shown = [{**row, "ppl": f"{row['ppl']:.5f}"} for row in rows]  # more digits than .3g
    print(table(shown, ["run", "ppl", "seconds", "tokens/s", "vs llama.cpp", "vs transformers"]))
    out = save(
        "eval_speed_all" if args.all else "eval_speed",
        {
            "model": path.name,
            "ctx": args.ctx,
            "chunks": n_chunks,
            "tokens_scored": scored,
            "threads": args.threads,
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
