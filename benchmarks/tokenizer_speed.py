"""Tekken encode throughput: ours (tiktoken) vs mistral-common's Tekkenizer, one run.

    python benchmarks/tokenizer_speed.py [--mb 4]

The corpus is the multilingual sample (prose in 25 languages and source code) repeated in
shuffled order to a few MB of documents. "single" encodes the documents one by one;
"batch" hands them all over at once (ours: tiktoken's thread pool; mistral-common has no
batch call, so it encodes them one by one).
"""

from __future__ import annotations

import argparse
import random

from common import best_time, save, table
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_nemo.tokenizer import Tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file
from tests.data.multilingual import CODE, PROSE


def corpus(megabytes: float) -> list[str]:
    docs = [text for _, text in PROSE.values()] + list(CODE.values())
    docs += [p for _, text in PROSE.values() for p in text.split("\n\n")]
    rng = random.Random(0)
    out: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        doc = rng.choice(docs)
        out.append(doc)
        size += len(doc.encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=4.0)
    args = parser.parse_args()
    docs = corpus(args.mb)
    nbytes = sum(len(d.encode()) for d in docs)
    ours = Tokenizer.from_file(reference_tekken_file())
    ref = Tekkenizer.from_file(reference_tekken_file())
    assert ours.encode_batch(docs[:200]) == [ref.encode(d, False, False) for d in docs[:200]]

    timings = {
        "ours single": best_time(lambda: [ours.encode(d) for d in docs], 3),
        "ours batch": best_time(lambda: ours.encode_batch(docs), 3),
        "mistral-common single": best_time(lambda: [ref.encode(d, False, False) for d in docs], 3),
    }
    mbs = {k: nbytes / t / 1e6 for k, t in timings.items()}
    rows = [
        {
            "mode": "single",
            "ours_MB_s": mbs["ours single"],
            "mistral_common_MB_s": mbs["mistral-common single"],
            "ratio": mbs["ours single"] / mbs["mistral-common single"],
        },
        {
            "mode": "batch",
            "ours_MB_s": mbs["ours batch"],
            "mistral_common_MB_s": mbs["mistral-common single"],
            "ratio": mbs["ours batch"] / mbs["mistral-common single"],
        },
    ]
    print(f"{len(docs)} documents, {nbytes / 1e6:.1f} MB")
    print(table(rows, list(rows[0])))
    print(
        f"wrote {save('tokenizer_speed', {'documents': len(docs), 'bytes': nbytes, 'rows': rows})}"
    )


if __name__ == "__main__":
    main()
