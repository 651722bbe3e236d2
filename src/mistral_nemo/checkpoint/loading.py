"""A model from a checkpoint, one tensor at a time.

The model class comes from the caller (`Transformer.from_pretrained` passes itself), so
the checkpoint code does not depend on the model's module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from tqdm import tqdm

from mistral_nemo.checkpoint.reading import open_checkpoint
from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import CheckpointError
from mistral_nemo.quant import check_scheme, is_linear_weight, layer_scheme, quantize_linear

Model = TypeVar("Model", bound=nn.Module)


def load_model(
    path: str | Path,
    build: Callable[[ModelConfig], Model],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    quantize: str | None = None,
    group_size: int = 128,
) -> Model:
    """Build the model on the meta device with `build(config)`, then assign each tensor as
    it is read.

    On CPU in the file's dtype the weights stay memory-mapped (no copy at all); otherwise
    each tensor is converted on its own, so peak memory is the result plus one tensor. With
    `quantize`, each linear weight is quantized as it is read and its source dropped.
    """
    if quantize is not None:
        check_scheme(quantize, group_size)
    ckpt = open_checkpoint(path)
    if quantize is not None and ckpt.quant is not None:
        raise CheckpointError(f"{path}: is already quantized ({ckpt.quant[0]})")
    with torch.device("meta"):
        model = build(ckpt.config)
    state = {}
    for name in tqdm(ckpt.tensors, desc="loading", unit="tensor", disable=not progress):
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        if ckpt.quant is not None and is_linear_weight(name):
            setattr(model.get_submodule(parent), attr, ckpt.load_quantized(name, device))
        elif quantize and is_linear_weight(name):
            weight = ckpt.load(name, device=device)
            layer = quantize_linear(weight, layer_scheme(name, quantize), group_size)
            setattr(model.get_submodule(parent), attr, layer)
            del weight
        else:
            state[name] = ckpt.load(name, dtype, device)
    if ckpt.config.tie_embeddings and quantize:
        # The LM head reads the whole table every token: a quantized copy of it pays.
        head = quantize_linear(
            state["tok_embeddings.weight"], layer_scheme("output", quantize), group_size
        )
        setattr(model, "output", head)  # noqa: B010 (a quantized layer, not a Linear)
    elif ckpt.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(not t.is_meta for t in model.state_dict().values()), missing
    head, embeddings = model.get_submodule("output"), model.get_submodule("tok_embeddings")
    if ckpt.config.tie_embeddings and isinstance(head, nn.Linear):
        assert isinstance(embeddings, nn.Embedding)
        # assign=True gave the head a parameter of its own (over the same tensor): one
        # parameter again, or training would untie them.
        head.weight = embeddings.weight
    return model.eval().requires_grad_(False)
