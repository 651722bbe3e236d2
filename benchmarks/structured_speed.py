"""What structured outputs cost per decode step: the engine's step time with every sequence
held to a constraint vs unconstrained, batch 1 and 16, on the demo model, in one run; and the
two mask libraries (llguidance, which the engine uses, and xgrammar if installed) on the
same vocabularies.

    python benchmarks/structured_speed.py [--steps 48] [--batches 1,16]

Engine: each of --batches prompts decodes --steps tokens greedily (EOS ignored), once free
and once held to a regex that lets any lowercase text through (so both runs decode the same
number of tokens, and the constrained one computes a mask at every step); the figure is the
median step time after the prefill. Libraries: the per-token mask time and the compile
time of structured_validity.py's JSON schema (nested objects, enums, an array, ranges),
stepping through a valid output, on Tekken (131k, random tiny checkpoint with the real
tekken.json) and the demo model's GGUF vocabulary (49k). xgrammar's wheel needs
transformers and triton besides; to measure it without them, install it with --no-deps
(plus apache-tvm-ffi) in a scratch venv that sees this one's packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import save, table
from structured_validity import PLAN

from mistral_nemo import LLM, ModelConfig
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.demo import demo_model_path
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.structured import Guidance, GuidedState, VocabularyView, llg_tokenizer
from mistral_nemo.tokenizer import BaseTokenizer, load_tokenizer

ANSWER = {
    "city": "Paris",
    "days": 5,
    "units": "celsius",
    "stops": [{"name": "Lyon", "nights": 2}, {"name": "Nice", "nights": 3}],
    "budget": 1200,
}  # valid under PLAN


def step_times(llm: LLM, batch: int, steps: int, guided: Guidance | None) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, guided=guided)
    for i in range(batch):
        llm.engine.add_request(llm.encode(f"Story {i}:"), params)
    times = []
    while llm.engine.has_unfinished():
        start = time.perf_counter()
        llm.engine.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # after the prefill


def engine_rows(steps: int, batches: list[int]) -> list[dict]:
    llm = LLM(demo_model_path())
    anything = Guidance(regex="[a-z ,.]{1,1000}")
    rows = []
    for batch in batches:
        step_times(llm, batch, 4, None)  # warm-up
        free = statistics.median(step_times(llm, batch, steps, None))
        held = statistics.median(step_times(llm, batch, steps, anything))
        rows.append(
            {
                "batch": batch,
                "free ms/step": free * 1e3,
                "guided ms/step": held * 1e3,
                "overhead %": (held / free - 1) * 100,
            }
        )
    return rows


def library_row(library: str, setup: float, compile_s: float, times: list[float]) -> dict:
    return {
        "library": library,
        "setup s": setup,
        "compile ms": compile_s * 1e3,
        "mask us median": statistics.median(times) * 1e6,
        "mask us max": max(times) * 1e6,
    }


def llguidance_row(tok: BaseTokenizer, vocab: int) -> dict:
    start = time.perf_counter()
    lt = llg_tokenizer(tok, vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    state = GuidedState(lt, Guidance(json_schema=PLAN).llguidance_grammar())
    compile_s = time.perf_counter() - start
    mask = np.empty((vocab + 31) // 32, dtype=np.int32)
    times = []
    for token in tok.encode(json.dumps(ANSWER)) + [tok.eos_id]:
        start = time.perf_counter()
        state.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        times.append(time.perf_counter() - start)
        assert state.advance(token)
    return library_row("llguidance", setup, compile_s, times)


def xgrammar_row(tok: BaseTokenizer, vocab: int) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    start = time.perf_counter()
    info = xgr.TokenizerInfo(
        VocabularyView(tok).tokens,
        vocab_type=xgr.VocabType.RAW,
        vocab_size=vocab,
        stop_token_ids=[tok.eos_id],
    )
    compiler = xgr.GrammarCompiler(info)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(PLAN), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for token in tok.encode(json.dumps(ANSWER)) + [tok.eos_id]:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - start)
        assert matcher.accept_token(token)
    return library_row("xgrammar", setup, compile_s, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = engine_rows(args.steps, [int(b) for b in args.batches.split(",")])
    print(table(engine, list(engine[0])))
    libraries = []
    with tempfile.TemporaryDirectory() as tmp:
        tekken = Path(tmp) / "tekken"
        init_random(tekken, ModelConfig.preset("tiny"), "hf", dtype=torch.float32)
        for name, path in (("tekken", tekken), ("demo GGUF", demo_model_path())):
            tok = load_tokenizer(path)
            for row in (llguidance_row(tok, tok.n_words), xgrammar_row(tok, tok.n_words)):
                if row is not None:
                    libraries.append({"vocabulary": f"{name} ({tok.n_words})", **row})
    print()
    print(table(libraries, list(libraries[0])))
    out = save("structured_speed", {"steps": args.steps, "engine": engine, "libraries": libraries})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
