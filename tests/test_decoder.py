"""The C decode step (all layers of one token in one call) against the module-by-module path."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mistral_nemo import ModelConfig, Transformer, kernels
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.runtime import ModelRunner
from mistral_nemo.runtime import decode_step as decode_step_module
from mistral_nemo.runtime.decode_step import kv_layouts
from mistral_nemo.runtime.paged import PagedKVCache

# head_dim != dim / heads and GQA, as NeMo; widths that every int4 group size divides.
CONFIG = ModelConfig(
    dim=256,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=48,
    hidden_dim=384,
    vocab_size=512,
    max_seq_len=1024,
)
PROMPT = [5, 77, 300, 12, 9, 401]
STEPS = 6

pytestmark = pytest.mark.skipif(
    not kernels.available(torch.float32), reason="no vectorized kernels on this machine"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "ckpt"
    init_random(path, CONFIG, "mistral", seed=3, dtype=torch.float32)
    return path


def load(checkpoint, scheme):
    if scheme == "fp32":
        return Transformer.from_pretrained(checkpoint, dtype=torch.float32)
    return Transformer.from_pretrained(
        checkpoint, dtype=torch.float32, quantize=scheme, group_size=64
    )


def decode_logits(
    model, cache_factory, through_c: bool, fed: list | None = None, prompt: list = PROMPT
) -> torch.Tensor:
    """Logits of STEPS greedy decode steps after `prompt`, each step through the C decoder (the
    runner) or through the modules (the plain model); the tokens fed go to `fed`."""
    runner = ModelRunner(model)
    cache = cache_factory(model, len(prompt) + STEPS)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), 0, cache.prefill(len(prompt)), last_only=True)
    out = []
    for step in range(STEPS):
        token = torch.tensor([[int(logits[0, -1].argmax())]])
        if fed is not None:
            fed.append(int(token))
        pos = len(prompt) + step
        with torch.inference_mode():
            forward = runner.logits if through_c else model
            logits = forward(token, pos, cache.decode(pos))
        out.append(logits[0, -1])
    return torch.stack(out)


class Contiguous:
    def __init__(self, model, length):
        self.cache = model.new_cache(1, length)

    def prefill(self, n):
        return self.cache

    def decode(self, pos):
        return self.cache


class Paged:
    """One sequence in a pool of 4-slot blocks, its table out of order."""

    def __init__(self, model, length):
        blocks = -(-length // 4)
        self.cache = PagedKVCache(CONFIG, blocks + 3, 4, 1024, torch.float32, torch.device("cpu"))
        self.table = torch.randperm(blocks + 3, generator=torch.Generator().manual_seed(0))
        self.table = self.table[:blocks].tolist()

    def prefill(self, n):
        return self.cache.step([self.table], [0], n)

    def decode(self, pos):
        return self.cache.step([self.table], [pos], 1)


def skip_without_kernel(scheme: str) -> None:
    kind = {"int8": kernels.WeightKind.INT8, "int4": kernels.WeightKind.INT4}.get(
        scheme, torch.float8_e4m3fn
    )
    if scheme != "fp32" and not kernels.available(kind):
        pytest.skip("no kernel for this scheme here")


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4", "fp8", "fp8-channel"])
@pytest.mark.parametrize("cache", [Contiguous, Paged])
def test_decode_step_matches_the_modules(checkpoint, scheme, cache):
    skip_without_kernel(scheme)
    model = load(checkpoint, scheme)
    assert ModelRunner(model).decode_step.decoder() is not None
    fast = decode_logits(model, cache, through_c=True)
    slow = decode_logits(model, cache, through_c=False)
    # fp32 agrees to rounding. The quantized kernels round activations to int8 (bf16 for
    # fp8) first, where a last-bit difference upstream can flip a rounding: 0.3-1.3% here
    # once one has (a flipped key or value stays in the cache).
    tolerance = 1e-5 if scheme == "fp32" else 2e-2
    assert (fast - slow).abs().max() < tolerance * slow.abs().max()


@pytest.mark.parametrize("cache", [Contiguous, Paged])
def test_long_context_attention_on_all_threads(checkpoint, cache):
    """Past 64k multiply-adds (here 4 heads x 48 x 341 positions) the heads are shared by
    the worker threads."""
    model = load(checkpoint, "fp32")
    prompt = torch.randint(3, 500, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = decode_logits(model, cache, through_c=True, prompt=prompt)
    slow = decode_logits(model, cache, through_c=False, prompt=prompt)
    assert (fast - slow).abs().max() < 1e-5 * slow.abs().max()


MANY = (5, 17, 400, 3, 1, 33, 64, 130, 2, 77, 250, 9)


@pytest.mark.parametrize(
    ("scheme", "lengths"),
    [
        ("fp32", (5, 17, 400)),
        ("int4", (5, 17, 400)),
        ("fp8", (5, 17, 400)),
        ("fp32", MANY),
        ("int8", MANY),
        ("fp32", tuple(range(1, 41))),
    ],
    ids=["fp32", "int4", "fp8", "fp32-12", "int8-12", "fp32-40"],
)
def test_a_batch_of_sequences_decodes_as_each_alone(checkpoint, scheme, lengths):
    """Sequences of different lengths (one long enough for threaded attention) in one paged
    pool, decoded together in C: up to kernels.fp32_rows per call (fp32 products in tiles,
    quantized ones reading each weight row once for all; the attention of all sequences one
    list of jobs), more in several calls."""
    skip_without_kernel(scheme)
    model = load(checkpoint, scheme)
    runner = ModelRunner(model)
    assert runner.decode_step.decoder() is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    sizes = [-(-(n + STEPS) // 4) for n in lengths]
    cache = PagedKVCache(CONFIG, sum(sizes) + 5, 4, 1024, torch.float32, torch.device("cpu"))
    order = torch.randperm(sum(sizes) + 5, generator=g).tolist()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    tables = [order[end - size : end] for size, end in zip(sizes, ends, strict=True)]

    def run(through_c: bool) -> torch.Tensor:
        tokens = []
        with torch.inference_mode():
            for prompt, table in zip(prompts, tables, strict=True):
                step = cache.step([table], [0], len(prompt))
                logits = model(torch.tensor([prompt]), cache=step, last_only=True)
                tokens.append(int(logits[0, -1].argmax()))
        out = []
        for i in range(STEPS):
            step = cache.step(tables, [len(p) + i for p in prompts], 1)
            assert len(kv_layouts(step, 0)) == len(prompts)
            with torch.inference_mode():
                forward = runner.logits if through_c else model
                logits = forward(torch.tensor(tokens)[:, None], cache=step)[:, -1]
            tokens = logits.argmax(-1).tolist()
            out.append(logits)
        return torch.stack(out)

    fast, slow = run(through_c=True), run(through_c=False)
    if scheme == "fp32":
        assert (fast - slow).abs().max() < 1e-5 * slow.abs().max()
    else:
        # Activations are rounded to int8 (bf16 for fp8) for the products: a last-bit
        # difference upstream (C attention against torch's) may flip one rounding, which
        # moves that sequence's logits by up to ~2% from then on. Most agree to rounding.
        error = (fast - slow).norm(dim=-1) / slow.norm(dim=-1)  # [step, sequence]
        assert error.median() < 1e-4 and error.max() < 5e-2


def test_a_batch_in_the_contiguous_cache(checkpoint):
    model = load(checkpoint, "fp32")
    runner = ModelRunner(model)
    prompts = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(4))

    def run(through_c: bool) -> torch.Tensor:
        cache = model.new_cache(2, 9 + STEPS)
        with torch.inference_mode():
            logits = model(prompts, 0, cache, last_only=True)
        out = []
        for i in range(STEPS):
            tokens = logits[:, -1].argmax(-1)[:, None]
            assert len(kv_layouts(cache, 9 + i)) == 2
            with torch.inference_mode():
                logits = (runner.logits if through_c else model)(tokens, 9 + i, cache)
            out.append(logits[:, -1])
        return torch.stack(out)

    fast, slow = run(through_c=True), run(through_c=False)
    assert (fast - slow).abs().max() < 1e-5 * slow.abs().max()


def test_fp32_decode_matches_a_full_forward(checkpoint):
    model = load(checkpoint, "fp32")
    fed: list[int] = []
    fast = decode_logits(model, Contiguous, through_c=True, fed=fed)
    with torch.inference_mode():
        full = model(torch.tensor([PROMPT + fed]))[0, len(PROMPT) :]
    assert (fast - full).abs().max() < 1e-5 * full.abs().max()


def test_separate_projections_and_fused_ones(checkpoint, monkeypatch):
    """The quantized q/k/v and gate/up products of a narrow model, stacked into one each for
    the C step, give the numbers of the separate layers."""
    model = load(checkpoint, "int8")
    assert len(decode_step_module._layer_spec(model.layers[0], fuse=True).qkv) == 1
    fused = decode_logits(model, Contiguous, through_c=True)
    monkeypatch.setattr(decode_step_module, "FUSE_MAX_ELEMENTS", 0)
    separate = decode_logits(model, Contiguous, through_c=True)
    assert (fused - separate).abs().max() < 1e-4 * fused.abs().max()


def test_replaced_weights_and_unknown_layers_are_seen(checkpoint):
    model = load(checkpoint, "fp32")
    runner = ModelRunner(model)
    before = decode_logits(model, Contiguous, through_c=True)
    first = runner.decode_step.decoder()
    assert first is runner.decode_step.decoder()  # cached while nothing changed
    wo = model.layers[1].attention.wo
    wo.weight = torch.nn.Parameter(wo.weight.detach() * 2)
    assert runner.decode_step.decoder() is not first
    doubled = decode_logits(model, Contiguous, through_c=True)
    assert not torch.allclose(doubled, before)
    assert torch.allclose(doubled, decode_logits(model, Contiguous, through_c=False), atol=1e-4)

    class Scaled(torch.nn.Module):  # a layer type the kernels do not know: the module path
        def __init__(self, inner: torch.nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    wo_layer = model.layers[1].attention.wo
    model.layers[1].attention.wo = Scaled(wo_layer)
    assert runner.decode_step.decoder() is None
    assert torch.allclose(
        decode_logits(model, Contiguous, through_c=True),
        decode_logits(model, Contiguous, through_c=False),
        atol=1e-5,
    )


def test_bf16_models_and_copies(checkpoint):
    model = load(checkpoint, "fp32")
    runner = ModelRunner(model)
    first = runner.decode_step.decoder()
    clone = copy.deepcopy(model)
    assert ModelRunner(clone).decode_step.decoder() not in (None, first)
    assert ModelRunner(pickle.loads(pickle.dumps(model))).decode_step.decoder() is not None
    model.to(torch.bfloat16)
    assert runner.decode_step.decoder() is None  # bf16 activations: the torch path


def test_which_decode_steps_the_kernels_take(checkpoint):
    """Whether the kernels do a decode step of n sequences (torch then keeps to one thread):
    the C step must take n, and the kernels the LM head's product of n rows."""
    model = load(checkpoint, "fp32")
    runner = ModelRunner(model)
    assert not runner.kernels_take(1)  # one row by this narrow model's head: torch's product
    head_rows = kernels.fp32_rows(CONFIG.dim)  # (AVX-512: 128, in C calls of 32; AVX2: 4)
    assert runner.kernels_take(2) and runner.kernels_take(min(40, head_rows))
    assert not runner.kernels_take(head_rows + 1)  # the head: torch's
    if kernels.available(kernels.WeightKind.INT8):
        quantized = ModelRunner(load(checkpoint, "int8"))
        assert quantized.kernels_take(kernels.MAX_BATCH_QUANTIZED)
        assert not quantized.kernels_take(kernels.MAX_BATCH_QUANTIZED + 1)  # quantized head
    model.to(torch.bfloat16)
    assert not runner.kernels_take(2)
