"""The `mistral-nemo` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mistral_nemo.config import PRESETS, ModelConfig
from mistral_nemo.errors import MistralNemoError
from mistral_nemo.sampling import DEFAULT_TEMPERATURE

if TYPE_CHECKING:
    from mistral_nemo.engine import LLM
    from mistral_nemo.model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else DTYPES[name]


def _model_path(args: argparse.Namespace) -> Path:
    """The checkpoint named on the command line, or the demo model; labelled if random."""
    from mistral_nemo.checkpoint import RANDOM_MARKER
    from mistral_nemo.demo import LABEL, demo_model_path

    if args.model is None:
        print(LABEL, file=sys.stderr)
        return demo_model_path()
    path = Path(args.model)
    if (path / RANDOM_MARKER).is_file():
        print(f"[{path} holds RANDOM weights: expect noise, not language]", file=sys.stderr)
    return path


def _load_model(args: argparse.Namespace, path: Path) -> Transformer:
    """The model at `path` as the loading options ask. With --lora, the adapter is merged
    into the weights as loaded, and --quantize then quantizes the merged model (it is in
    memory in full precision once)."""
    from mistral_nemo.model import Transformer

    if args.lora is None:
        return Transformer.from_pretrained(
            path,
            dtype=_dtype(args.dtype),
            device=args.device,
            quantize=args.quantize,
            group_size=args.group_size,
        )
    from mistral_nemo.train.lora import load_merged

    return load_merged(
        path, args.lora, _dtype(args.dtype), args.device, args.quantize, args.group_size
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from mistral_nemo.generate import generate
    from mistral_nemo.tokenizer import load_tokenizer

    model_path = _model_path(args)
    tokenizer = load_tokenizer(model_path)
    model = _load_model(args, model_path)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    runner, cache, seed, shows = None, None, args.seed, True
    if args.tp > 1:  # under torchrun: every rank runs its share, the main one prints
        from mistral_nemo.parallel import init_world, shared_seed, split_for_generation

        world = init_world(args.tp, args.device)
        runner, cache = split_for_generation(model, world, len(prompt) + args.max_tokens)
        seed, shows = shared_seed(world, args.seed), world.is_main
    stream = tokenizer.stream_decoder()
    start, n = time.perf_counter(), 0
    for token in generate(
        model,
        prompt,
        args.max_tokens,
        args.temperature,
        args.top_p,
        args.top_k,
        seed,
        stop_ids=[tokenizer.eos_id],
        runner=runner,
        cache=cache,
    ):
        if shows:
            print(stream.push(token), end="", flush=True)
        n += 1
    if shows:
        print(stream.flush())
        elapsed = time.perf_counter() - start
        print(f"[{len(prompt)} prompt tokens, {n} generated in {elapsed:.2f} s]", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    from mistral_nemo.checkpoint import convert_checkpoint
    from mistral_nemo.checkpoint.gguf_export import export_gguf

    if args.to == "gguf":
        export_gguf(args.src, args.dst, args.type, progress=True)
        print(f"wrote {args.dst} (GGUF, {args.type})", file=sys.stderr)
        return
    convert_checkpoint(args.src, args.dst, args.to, dtype=_dtype(args.dtype), progress=True)
    print(f"wrote {args.dst} ({args.to} layout)", file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> None:
    if args.calibration:
        from mistral_nemo.quant.calibration import quantize_checkpoint_calibrated

        text = Path(args.calibration).read_text(errors="replace")
        quantize_checkpoint_calibrated(
            args.src, args.dst, args.scheme, args.group_size, text, count=args.calibration_windows
        )
    else:
        from mistral_nemo.checkpoint import quantize_checkpoint

        quantize_checkpoint(args.src, args.dst, args.scheme, args.group_size, progress=True)
    print(f"wrote {args.dst} ({args.scheme}, Hugging Face layout)", file=sys.stderr)


def cmd_merge(args: argparse.Namespace) -> None:
    from mistral_nemo.train.lora import merge_checkpoint

    merge_checkpoint(args.base, args.adapter, args.out, args.layout, progress=True)
    print(f"wrote {args.out}: {args.base} with {args.adapter} merged in", file=sys.stderr)


def cmd_init_random(args: argparse.Namespace) -> None:
    from mistral_nemo.checkpoint.random_init import init_random

    config = ModelConfig.preset(args.preset)
    init_random(args.out, config, args.format, args.seed, DTYPES[args.dtype], progress=True)
    print(
        f"wrote {args.out}: random {args.preset} weights, {args.format} layout, "
        f"{config.num_parameters() / 1e6:.1f} M parameters",
        file=sys.stderr,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from mistral_nemo.planner import format_plan, parse_bytes, plan_memory

    config = ModelConfig.from_dir(args.model) if args.model else ModelConfig.preset(args.preset)
    capacity = parse_bytes(args.memory) if args.memory else None
    if args.train:
        _plan_training(args, config, capacity)
        return
    plan = plan_memory(config, args.context, args.batch, args.weights, args.kv, args.chunk)
    print(
        f"{args.model or args.preset}: {config.num_parameters() / 1e9:.2f} B parameters, "
        f"context {args.context} x batch {args.batch}, weights {args.weights}, KV {args.kv}"
    )
    print(format_plan(plan, capacity))


def _plan_training(args: argparse.Namespace, config: ModelConfig, capacity: int | None) -> None:
    from mistral_nemo.planner import format_plan, plan_training

    # Training loads the base in fp32, or quantized (QLoRA) as --weights says.
    base = args.weights if args.weights in ("fp8", "int8", "int4") else "fp32"
    plan = plan_training(
        config,
        args.context,
        args.batch,
        args.dp,
        args.tp,
        args.lora_rank,
        base,
        args.activation_checkpointing,
        args.sequence_parallel,
    )
    what = f"LoRA r{args.lora_rank}, {base} base" if args.lora_rank else "full fine-tuning"
    print(
        f"{args.model or args.preset}: {config.num_parameters() / 1e9:.2f} B parameters, "
        f"{what}, micro-batch {args.batch} x {args.context} tokens, dp {args.dp} x tp {args.tp}"
        + (", activation checkpointing" if args.activation_checkpointing else "")
    )
    print(format_plan(plan, capacity))


def _load_llm(args: argparse.Namespace, **engine: Any) -> LLM:
    """The engine over the checkpoint named on the command line (or the demo model)."""
    from mistral_nemo.engine import LLM
    from mistral_nemo.tokenizer import load_tokenizer

    path = _model_path(args)
    llm = LLM(
        _load_model(args, path),
        load_tokenizer(path),
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory=args.kv_cache_memory,
        **engine,
    )
    llm.path = path  # what it was loaded from: the served model's name, reports
    return llm


def cmd_chat(args: argparse.Namespace) -> None:
    from mistral_nemo.chat import run_chat
    from mistral_nemo.engine import SamplingParams

    llm = _load_llm(args, max_num_seqs=1)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    run_chat(llm, params, args.system)


def cmd_eval_choice(args: argparse.Namespace) -> None:
    from mistral_nemo.eval import tasks

    questions = tasks.read_questions(args.file)[: args.limit]
    shots = tasks.read_questions(args.dev)[: args.shots] if args.dev and args.shots else []
    result = tasks.run_multiple_choice(_load_llm(args), questions, shots, progress=True)
    _report_task(args, result.summary())


def cmd_eval_generation(args: argparse.Namespace) -> None:
    from mistral_nemo.eval import tasks

    examples = tasks.read_generation_examples(args.file)[: args.limit]
    shots = (
        tasks.read_generation_examples(args.dev)[: args.shots] if args.dev and args.shots else []
    )
    result = tasks.run_generation(
        _load_llm(args), examples, shots, args.max_tokens, args.stop or ["\n\n"], args.regex
    )
    _report_task(args, result.summary())


def _report_task(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    from mistral_nemo.eval.report import write_json

    summary = {
        "task": args.file,
        "model": str(_model_path(args)),
        "shots": args.shots,
        "quantize": args.quantize,
        "kv_cache_dtype": args.kv_cache_dtype,
        **summary,
    }
    shown = (f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items())
    print("  ".join(shown))
    if args.json:
        write_json(args.json, summary)


def cmd_eval_lm_eval(args: argparse.Namespace) -> None:
    from mistral_nemo.eval.lm_eval_adapter import run_lm_eval_cli

    run_lm_eval_cli(args.lm_eval_args)


def cmd_serve(args: argparse.Namespace) -> None:
    from mistral_nemo.server import create_app
    from mistral_nemo.server.run import run_server

    llm = _load_llm(args, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    name = args.served_model_name or Path(llm.path).name
    app = create_app(
        llm,
        name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        json_logs=args.log_format == "json",
    )
    print(f"serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    run_server(app, args.host, args.port, args.shutdown_timeout, args.log_format)
    print("server stopped", file=sys.stderr)


def cmd_eval_perplexity(args: argparse.Namespace) -> None:
    from mistral_nemo.eval.perplexity import perplexity

    result = perplexity(
        _model_path(args),
        args.file,
        ctx=args.ctx,
        batch=args.batch,
        stride=args.stride,
        dtype=_dtype(args.dtype),
        device=args.device,
        quantize=args.quantize,
        group_size=args.group_size,
        kv_cache_dtype=args.kv_cache_dtype,
        chunks=args.chunks,
        progress=True,
    )
    print(result.summary())
    if args.json:
        result.save_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)


def cmd_eval_needle(args: argparse.Namespace) -> None:
    from mistral_nemo.eval.needle import run_needle, save_report

    report = run_needle(
        _load_llm(args),
        None if args.lengths == "auto" else [int(n) for n in args.lengths.split(",")],
        [float(d) for d in args.depths.split(",")],
        samples=args.samples,
        seed=args.seed,
        chat=args.chat,
        max_tokens=args.max_tokens,
        settings={"quantize": args.quantize},
    )
    for depth, row in zip(report["depths"], report["scores"], strict=True):
        print(f"depth {depth:.2f}: " + "  ".join(f"{s:4.0%}" for s in row))
    name = "needle-" + ("demo" if args.model is None else Path(args.model).stem)
    paths = save_report(report, args.out, name)
    print(
        f"lengths {report['lengths']}, mean {report['mean_score']:.0%}, "
        f"{report['seconds']:.0f} s; wrote {', '.join(map(str, paths))}",
        file=sys.stderr,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from mistral_nemo.train.config import load_config

    settings = list(args.settings)
    path = settings.pop(0) if settings and "=" not in settings[0] else None
    if args.plot:
        settings.append("plot=true")
    if args.show_masking:
        _show_masking(args.show_masking, path, settings)
        return
    from mistral_nemo.train.trainer import train

    result = train(load_config(path, settings))
    if int(os.environ.get("RANK", "0")):
        return  # the main process reports
    if result.interrupted:
        print(f"stopped at step {result.steps}; run the same command to resume", file=sys.stderr)
    else:
        print(f"trained {result.steps} steps; saved {result.output}", file=sys.stderr)


def _show_masking(file: str, config_path: str | None, settings: list[str]) -> None:
    """One encoded conversation of FILE, the trained tokens marked, with the tokenizer of
    the configured model (or the demo model's)."""
    import yaml

    from mistral_nemo.demo import demo_model_path
    from mistral_nemo.tokenizer import load_tokenizer
    from mistral_nemo.train.sft import first_conversation, show_masking

    values = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
    for item in settings:
        key, _, raw = item.partition("=")
        values[key] = yaml.safe_load(raw)
    tokenizer = load_tokenizer(values.get("model") or demo_model_path())
    print(show_masking(tokenizer, first_conversation(Path(file)), color=sys.stdout.isatty()))


def _add_task_options(p: argparse.ArgumentParser) -> None:
    _add_loading_options(p)
    p.add_argument("file", help="the task's JSONL file (see mistral_nemo/eval/tasks.py)")
    p.add_argument("--dev", default=None, help="JSONL of solved examples for --shots")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each one")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 4GiB (default: 30%% of free)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--json", default=None, help="also write the results to this file")


def _add_loading_options(p: argparse.ArgumentParser, lora: bool = True) -> None:
    p.add_argument(
        "model_arg",
        nargs="?",
        metavar="model",
        help="checkpoint folder (Mistral or Hugging Face layout) or .gguf file "
        "(default: the demo model)",
    )
    p.add_argument("--model", default=None, help="same as the positional argument")
    p.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="weights dtype (auto: as stored)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--quantize",
        choices=["fp8", "fp8-channel", "int8", "int4"],
        default=None,
        help="quantize the linear layers while loading",
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32/64/128)")
    if lora:
        p.add_argument(
            "--lora",
            metavar="ADAPTER",
            default=None,
            help="LoRA adapter folder (PEFT's format) merged into the weights as they load "
            "(with --quantize: merged in full precision, then quantized)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-nemo", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message in the instruct format",
    )
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks, each holding 1/TP of every layer "
        "(torchrun --nproc-per-node TP -m mistral_nemo generate --tp TP ...)",
    )
    _add_loading_options(p)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("chat", help="talk with a model in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    _add_loading_options(p)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer token")
    p.add_argument("--served-model-name", default=None, help="model name clients use")
    _add_loading_options(p)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 4GiB (default: 30%% of free)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        default="auto",
        help="fp8: keys and values in E4M3 with a scale per layer",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="requests that may wait for a slot; past it, 429 with Retry-After (default: no limit)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds the requests in flight get to finish before they are failed",
    )
    p.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="the per-request log lines"
    )
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("convert", help="rewrite a checkpoint in another layout or as GGUF")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["hf", "mistral", "gguf"], required=True)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    p.add_argument(
        "--type", choices=["f32", "f16", "bf16", "q8_0"], default="bf16", help="GGUF tensor type"
    )
    p.set_defaults(func=cmd_convert)

    p = verbs.add_parser("plan", help="memory needed for weights, KV cache and activations")
    p.add_argument("--preset", choices=list(PRESETS), default="nemo-12b")
    p.add_argument("--model", help="read the config of this checkpoint instead of a preset")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once")
    p.add_argument(
        "--weights", choices=["fp32", "bf16", "fp16", "fp8", "int8", "int4"], default="bf16"
    )
    p.add_argument("--kv", choices=["fp32", "bf16", "fp16", "fp8"], default="bf16")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk size")
    p.add_argument("--memory", help="capacity to check against, e.g. 24GiB or 80GB")
    p.add_argument(
        "--train",
        action="store_true",
        help="memory per process of training (--context tokens x --batch sequences a "
        "micro-batch): weights, gradients, AdamW, working copies, activations",
    )
    p.add_argument("--dp", type=int, default=1, help="--train: data-parallel (FSDP2) ranks")
    p.add_argument("--tp", type=int, default=1, help="--train: tensor-parallel ranks")
    p.add_argument("--sequence-parallel", action="store_true", help="--train: with --tp")
    p.add_argument("--activation-checkpointing", action="store_true", help="--train")
    p.add_argument(
        "--lora-rank", type=int, default=0, help="--train: LoRA over a frozen base (--weights)"
    )
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("quantize", help="write a quantized copy of a checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--scheme", choices=["fp8", "fp8-channel", "int8", "int4"], required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32/64/128)")
    p.add_argument(
        "--calibration",
        metavar="TEXT_FILE",
        help="round with GPTQ on this text's activations (loads the whole model in fp32)",
    )
    p.add_argument(
        "--calibration-windows", type=int, default=16, help="512-token windows of it to use"
    )
    p.set_defaults(func=cmd_quantize)

    p = verbs.add_parser("merge", help="fold a LoRA adapter into a copy of its base checkpoint")
    p.add_argument("base", help="the checkpoint folder the adapter was trained on")
    p.add_argument("adapter", help="the adapter folder (PEFT's format)")
    p.add_argument("out", help="the merged checkpoint folder to write")
    p.add_argument("--layout", choices=["hf", "mistral"], default=None, help="default: the base's")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("init-random", help="write a random checkpoint in a real layout")
    p.add_argument("out")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--format", choices=["hf", "mistral"], default="mistral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.set_defaults(func=cmd_init_random)

    p = verbs.add_parser(
        "train",
        help="pre-train or fine-tune (full, LoRA, QLoRA) from a YAML config",
        description="mistral-nemo train [CONFIG.yaml] [key=value ...]: every setting of "
        "mistral_nemo.train.config.TrainConfig can be given in the YAML or as key=value "
        "(YAML syntax: lr=1e-4 data=[a.jsonl,b.jsonl]). Run the same command again to "
        "resume from the last checkpoint in output_dir.",
    )
    p.add_argument("settings", nargs="*", help="CONFIG.yaml and/or key=value settings")
    p.add_argument("--plot", action="store_true", help="write output_dir/loss.png at the end")
    p.add_argument(
        "--show-masking",
        metavar="FILE",
        default=None,
        help="print the first conversation of FILE encoded, trained tokens marked, and exit",
    )
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", help="score a model: perplexity, tasks, long context")
    tasks = p.add_subparsers(dest="task", required=True)
    p = tasks.add_parser("choice", help="log-likelihood multiple choice from a JSONL file")
    _add_task_options(p)
    p.set_defaults(func=cmd_eval_choice)
    p = tasks.add_parser("generation", help="greedy answers from a JSONL file, exact match")
    _add_task_options(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=None, help="stop string (default: \\n\\n)")
    p.add_argument("--regex", default=None, help="score the first group of this in the answer")
    p.set_defaults(func=cmd_eval_generation)
    p = tasks.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's command line, with `--model mistral-nemo` registered",
        add_help=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval_lm_eval)
    p = tasks.add_parser(
        "perplexity", help="perplexity and bits per byte on a text file (llama.cpp's protocol)"
    )
    _add_loading_options(p, lora=False)
    p.add_argument("file", help="UTF-8 text, e.g. the package's eval/data/corpus.txt")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (or window)")
    p.add_argument("--batch", type=int, default=8, help="chunks per forward pass")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding windows moved by this many tokens, each token scored once "
        "(default: llama.cpp's chunks, their second halves scored)",
    )
    p.add_argument("--chunks", type=int, default=None, help="evaluate the first N chunks alone")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result here")
    p.set_defaults(func=cmd_eval_perplexity)
    p = tasks.add_parser(
        "needle", help="needle in a haystack: retrieval across context length and depth"
    )
    _add_loading_options(p)
    p.add_argument(
        "--lengths",
        default="auto",
        help="prompt lengths in tokens, comma-separated (auto: powers of two from 1024 and "
        "the longest the context allows)",
    )
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, 0 to 1")
    p.add_argument("--samples", type=int, default=1, help="needles per cell")
    p.add_argument("--seed", type=int, default=0, help="draws the needles")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-tokens", type=int, default=24, help="answer tokens")
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 4GiB (default: 30%% of free)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    p.add_argument("--out", default=".", help="folder for needle-MODEL.json and .png")
    p.set_defaults(func=cmd_eval_needle)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "model_arg"):
        args.model = args.model or args.model_arg
    try:
        args.func(args)
    except MistralNemoError as e:
        print(f"mistral-nemo {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():  # launched by torchrun (train, generate --tp)
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
