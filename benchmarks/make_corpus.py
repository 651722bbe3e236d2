"""Writes src/mistral_nemo/eval/data/corpus.txt: the evaluation text of `mistral-nemo eval
perplexity` and the needle test's haystack.

    python benchmarks/make_corpus.py [--check]

The documentation of a fixed list of Python 3.11 standard library modules, as pydoc renders
it in plain text (`pydoc.render_doc(module, renderer=pydoc.plaintext)`): English prose, code
examples and API signatures, >= 100k tokens of the demo model's tokenizer and of Tekken. It is
the modules' docstrings, so the PSF License covers it; the file's header says so. Each
module's FILE section (a path on this machine), the boilerplate MODULE REFERENCE section and
the addresses in default values' reprs ("<object object at 0x...>") are left out, and lines
lose their trailing spaces, so the text is the same on every machine with Python 3.11.7.
`--check` rebuilds it and fails if the file differs.
"""

from __future__ import annotations

import argparse
import importlib
import pydoc
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "src" / "mistral_nemo" / "eval" / "data" / "corpus.txt"
PYTHON = (3, 11)

# Pure-Python modules whose docstrings are mostly prose, in a fixed order.
MODULES = [
    "json",
    "textwrap",
    "functools",
    "heapq",
    "bisect",
    "string",
    "difflib",
    "argparse",
    "fractions",
    "statistics",
    "csv",
    "dataclasses",
    "shlex",
    "contextlib",
    "abc",
    "fnmatch",
    "copy",
    "pprint",
    "graphlib",
    "queue",
    "sched",
    "base64",
    "gettext",
    "tokenize",
    "pathlib",
    "zipfile",
    "urllib.parse",
    "itertools",
    "datetime",
    "random",
    "weakref",
    "secrets",
]

HEADER = (
    "Python {version} standard library documentation: the docstrings of the modules "
    "{modules}, rendered as plain text by pydoc. Copyright (c) 2001-2023 Python Software "
    "Foundation; All Rights Reserved. Distributed under the PSF License Agreement for Python "
    "{version} (https://docs.python.org/{version}/license.html). Assembled by "
    "benchmarks/make_corpus.py of mistral-nemo, which leaves out file paths, memory "
    "addresses and pydoc's boilerplate."
)

# Sections that differ between machines or repeat the same sentences for every module.
DROPPED_SECTION = re.compile(r"^(FILE|MODULE REFERENCE)\n(?:(?:    .*)?\n)*?(?=\S)", re.M)
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def module_text(name: str) -> str:
    text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    text = DROPPED_SECTION.sub("", text + "END\n")[: -len("END\n")]
    return ADDRESS.sub("", text)


def build() -> str:
    version = ".".join(map(str, PYTHON))
    header = textwrap.fill(HEADER.format(version=version, modules=", ".join(MODULES)), 88)
    return "\n\n".join([header + "\n", *(module_text(m).strip("\n") + "\n" for m in MODULES)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs")
    args = parser.parse_args()
    if sys.version_info[:2] != PYTHON:
        sys.exit(
            f"run this with Python {PYTHON[0]}.{PYTHON[1]}: pydoc's text is that of its stdlib"
        )
    text = build()
    if args.check:
        if CORPUS.read_text(encoding="utf-8") != text:
            sys.exit(f"{CORPUS} differs from what this script builds")
        print(f"{CORPUS}: up to date")
        return 0
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    CORPUS.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {CORPUS}: {len(text.encode())} bytes, {len(MODULES)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
