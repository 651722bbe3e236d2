"""Writing evaluation results, atomically: through a temporary file in the same folder,
renamed into place, so a reader never sees half a file and a failure leaves none."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Create `path` with what `write` writes to the file it is given (created by `open`, it
    gets the umask's permissions)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    """`payload` as indented JSON."""
    text = json.dumps(payload, indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
