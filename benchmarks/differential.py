"""The long run of the differential tests against mistral-common 1.13.1: many more generated
chat requests and texts than CI runs, each counted by outcome.

    python benchmarks/differential.py [--chats 100000] [--texts 50000] [--seed N]

Every request is put to ours and to mistral-common. Outcomes: both accept (ids compared),
both refuse, we refuse by a deliberate rule (`STRICTER` in tests/differential.py, by name),
and disagreements, which must be zero. The first example of each disagreement is printed.
Writes benchmarks/results/differential.json.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from typing import Any

from common import ROOT, save, table

sys.path.insert(0, str(ROOT / "tests"))

import differential as d  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mistral_nemo.tokenizer import Tokenizer  # noqa: E402
from mistral_nemo.tokenizer.files import reference_tekken_file  # noqa: E402


def run(test: Any, examples: int, rng_seed: int) -> None:
    quiet = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    seed(rng_seed)(quiet(test))()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, default=100_000)
    parser.add_argument("--texts", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tok = Tokenizer.from_file(reference_tekken_file())
    ref = MistralTokenizer.from_file(str(reference_tekken_file()))
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, object] = {}

    @given(messages=d.conversations, tools=d.tools, cont=st.booleans())
    def chat(messages: Any, tools: Any, cont: bool) -> None:
        a, b = d.ours(tok, messages, tools, cont), d.reference(ref, messages, tools, cont)
        if a.ids is not None and b.ids is not None:
            key = "chat: both accept, same ids" if a.ids == b.ids else "DISAGREE: different ids"
        elif a.ids is None and b.ids is None:
            key = "chat: both refuse"
        elif a.ids is None and (rule := d.stricter_rule(a.error)):
            key = f"chat: we refuse by rule '{rule}'"
        else:
            key = "DISAGREE: " + ("we refuse" if a.ids is None else "we accept")
        counts[key] += 1
        if key.startswith("DISAGREE"):
            examples.setdefault(key, (messages, tools, cont, a.error, b.error))

    @given(text=d.tekken_text)
    def text(text: str) -> None:
        why = d.tekken_disagreement(tok, ref.instruct_tokenizer.tokenizer, text)
        key = f"DISAGREE: tekken {why}" if why else "tekken: same ids and text"
        counts[key] += 1
        if why:
            examples.setdefault(key, text)

    start = time.perf_counter()
    run(chat, args.chats, args.seed)
    run(text, args.texts, args.seed)
    elapsed = time.perf_counter() - start
    rows = [{"outcome": k, "count": n} for k, n in sorted(counts.items())]
    print(table(rows, ["outcome", "count"]))
    for key, example in examples.items():
        print(f"{key}: {example!r}")
    disagreements = sum(n for k, n in counts.items() if k.startswith("DISAGREE"))
    print(f"{sum(counts.values())} cases in {elapsed:.0f} s, {disagreements} disagreements")
    save("differential", {"config": vars(args), "rows": rows, "disagreements": disagreements})


if __name__ == "__main__":
    main()
