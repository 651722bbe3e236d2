"""A checkpoint folder as a llama.cpp GGUF file, with NeMo's Tekken tokenizer in its metadata.

Not re-exported by the package: this is the one part of the checkpoint code that needs the
tokenizer package, which itself reads GGUF files through `checkpoint.gguf_file`; imported
by the package, it would make the two packages import each other.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mistral_nemo.checkpoint.gguf_file import write_gguf
from mistral_nemo.checkpoint.reading import open_checkpoint
from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer.gguf_vocab import add_tekken_metadata
from mistral_nemo.tokenizer.tekken import Tokenizer


def export_gguf(
    src: str | Path, dst: str | Path, tensor_type: str = "bf16", progress: bool = False
) -> None:
    """Write a checkpoint folder as a llama.cpp GGUF file (architecture `llama`, NeMo's
    Tekken tokenizer as llama.cpp's converter writes it), one tensor at a time."""
    ckpt = open_checkpoint(src)
    if ckpt.layout == "gguf" or ckpt.quant is not None:
        raise CheckpointError(f"{src}: export to GGUF starts from an unquantized checkpoint folder")
    tokenizer = Tokenizer.from_pretrained(src)

    def metadata(writer: Any) -> None:
        writer.add_name(Path(src).name)
        add_tekken_metadata(writer, tokenizer)

    tensors = {name: (t.shape, partial(ckpt.load, name)) for name, t in ckpt.tensors.items()}
    with tqdm(total=len(tensors), desc="writing gguf", unit="tensor", disable=not progress) as bar:
        write_gguf(dst, ckpt.config, tensors, tensor_type, metadata, lambda _: bar.update())
