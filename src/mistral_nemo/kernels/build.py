"""Compiling csrc/*.c into one shared library, once per version of the sources, compiler and
flags, in a per-user cache."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mistral_nemo.kernels.header import SOURCES

# The code-generation flags, which MISTRAL_NEMO_CPU_KERNELS_CFLAGS replaces (for instance
# "-O3 -march=native -mno-avx512f" builds the library of a machine without AVX-512).
FLAGS_VARIABLE = "MISTRAL_NEMO_CPU_KERNELS_CFLAGS"
DEFAULT_FLAGS = "-O3 -march=native"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistral-nemo"


def build() -> Path | None:
    """The library, compiled on first use with the system C compiler; None without one or
    when the build fails (its last error line goes to stderr)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    flags = [
        *shlex.split(os.environ.get(FLAGS_VARIABLE, DEFAULT_FLAGS)),
        "-shared",
        "-fPIC",
        "-pthread",
    ]
    sources = sorted(SOURCES.glob("*.c"))
    key = hashlib.sha256(" ".join([compiler, *flags]).encode())
    for path in sorted(SOURCES.glob("*.[ch]")):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, *map(str, sources), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            print(
                f"mistral-nemo: CPU kernels unavailable, using torch "
                f"({result.stderr.strip().splitlines()[-1:]})",
                file=sys.stderr,
            )
            return None
        os.replace(built, target)  # atomic: concurrent first uses do not collide
    return target
