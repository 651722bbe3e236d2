"""Where the real NeMo tokenizer file comes from when a checkpoint does not bring one."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mistral_nemo.errors import CheckpointError

REFERENCE_TEKKEN = "tekken_240718.json"


def reference_tekken_file() -> Path:
    """The `tekken.json` of Mistral NeMo 2407, as shipped in mistral-common's package data."""
    try:
        data = resources.files("mistral_common") / "data" / REFERENCE_TEKKEN
    except ModuleNotFoundError:
        raise CheckpointError(
            "the NeMo tokenizer file comes from mistral-common's package data; "
            "install it with: pip install 'mistral-nemo[tekken]'"
        ) from None
    path = Path(str(data))
    if not path.is_file():
        raise CheckpointError(
            f"mistral-common is installed but lacks {REFERENCE_TEKKEN}; "
            "install mistral-common==1.13.1"
        )
    return path
