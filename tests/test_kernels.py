"""The CPU GEMV kernel against torch, including row lengths that leave partial vectors."""

import pytest
import torch
import torch.nn.functional as F

from mistral_nemo import kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "rows, cols", [(1, 1), (3, 31), (7, 33), (64, 128), (100, 515), (257, 5120), (33, 14336)]
)
def test_gemv_matches_torch(dtype, rows, cols):
    if not kernels.available(dtype):
        pytest.skip("no vectorized kernel on this machine")
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    x = torch.randn(cols, generator=g).to(dtype)
    expected = F.linear(x.double(), w.double())
    got = kernels.gemv(w, x)
    scale = (w.double().abs() @ x.double().abs()).max()
    assert (got.double() - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [2, 5, 8])
def test_gemv_of_a_few_vectors(dtype, batch):
    if not kernels.available(dtype):
        pytest.skip("no vectorized kernel on this machine")
    g = torch.Generator().manual_seed(batch)
    w = torch.randn(300, 700, generator=g).to(dtype)
    x = torch.randn(batch, 700, generator=g).to(dtype)
    expected = F.linear(x.double(), w.double())
    got = kernels.gemv(w, x)
    assert got.shape == (batch, 300)
    assert (got.double() - expected).abs().max() <= 1e-5 * (
        x.double().abs() @ w.double().abs().t()
    ).max()


@pytest.mark.parametrize(
    ("batch", "cols", "rows"),
    [(8, 700, 300), (16, 64, 32768), (33, 100, 1000), (17, 5, 15)],
    ids=["first-tiled", "streamed-output", "partial-tiles", "one-partial-tile"],
)
def test_fp32_gemv_of_many_vectors(batch, cols, rows):
    """From 8 vectors on, products run in tiles of 16 rows x 16 vectors (a last tile of
    each partial), with a large output written past the caches."""
    if not kernels.available(torch.float32):
        pytest.skip("no vectorized kernel on this machine")
    g = torch.Generator().manual_seed(cols)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(batch, cols, generator=g)
    expected = F.linear(x.double(), w.double())
    got = kernels.gemv(w, x)
    assert got.shape == (batch, rows)
    assert (got.double() - expected).abs().max() <= 1e-5 * (
        x.double().abs() @ w.double().abs().t()
    ).max()


def test_fp32_linear_of_a_few_rows_takes_the_kernel(monkeypatch):
    """(Without the vectorized kernel, every product is torch's, with the same results.)"""
    w, x = torch.randn(1024, 640), torch.randn(2, 3, 640)
    head = torch.randn(4096, 64)  # a tiny model's LM head: short rows are fine for batches
    calls, real = [], kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        out = kernels.linear(x, w)  # 6 rows
        logits = kernels.linear(torch.ones(16, 64), head)
        kernels.linear(torch.randn(kernels.fp32_rows(640) + 1, 640), w)  # torch's
        kernels.linear(torch.randn(1, 64), head)  # one short row: torch's
    # (Without tiles, AVX2's products take only a few rows.)
    taken = (kernels.fp32_rows(640) >= 6) + (kernels.fp32_rows(64) >= 16)
    assert len(calls) == (taken if kernels.available(torch.float32) else 0)
    assert out.shape == (2, 3, 1024)
    assert torch.allclose(out, F.linear(x, w), atol=1e-4)
    assert torch.allclose(logits, F.linear(torch.ones(16, 64), head), atol=1e-4)


def test_linear_dispatch_keeps_shape_dtype_and_values():
    w = torch.randn(2048, 1024).bfloat16()
    x = torch.randn(1, 1, 1024).bfloat16()
    with torch.inference_mode():
        out = kernels.linear(x, w)
    ref = F.linear(x.float(), w.float())
    assert out.shape == (1, 1, 2048) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2)
    # Several rows, or autograd, go through torch.
    x3 = torch.randn(3, 1024).bfloat16()
    assert torch.equal(kernels.linear(x3, w), F.linear(x3, w))
    wg = torch.randn(2048, 1024, requires_grad=True)
    xg = torch.randn(1, 1024)
    kernels.linear(xg, wg).sum().backward()
    assert wg.grad is not None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MISTRAL_NEMO_CPU_KERNELS", "0")
    kernels._library.cache_clear()
    kernels.available.cache_clear()
    try:
        assert not kernels.available(torch.bfloat16)
        w, x = torch.randn(2048, 1024), torch.randn(1, 1024)
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()
        kernels.available.cache_clear()


# 576 and 960 columns end in a partial block of 128.
@pytest.mark.parametrize(
    ("group", "cols"), [(32, 1024), (64, 1024), (128, 1024), (32, 576), (64, 576), (64, 960)]
)
def test_int4_gemv_matches_dequantized_weights(group, cols):
    from mistral_nemo.quant import quantize_linear

    if not kernels.available(kernels.WeightKind.INT4):
        pytest.skip("no int4 kernel on this machine")
    layer = quantize_linear(torch.randn(300, cols) * 0.02, "int4", group)
    x = torch.randn(cols).bfloat16()
    got = kernels.gemv_int4(layer.weight, layer.scales_zeros, group, x)
    ref = F.linear(x.float(), layer.dequantize(0, 300))
    # int8 activations (per group) on VNNI machines: ~1% error
    assert (got - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("cols", [1024, 576, 100])  # a last group of 64, one of 100
def test_int8_gemv_matches_dequantized_weights(cols):
    from mistral_nemo.quant import quantize_linear

    if not kernels.available(kernels.WeightKind.INT8):
        pytest.skip("no int8 kernel on this machine")
    layer = quantize_linear(torch.randn(300, cols) * 0.02, "int8")
    x = torch.randn(cols).bfloat16()
    got = kernels.gemv_int8(layer.weight, layer.weight_scale, x)
    ref = F.linear(x.float(), layer.weight.float() * layer.weight_scale[:, None])
    assert (got - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_gemv_of_several_vectors_is_each_alone(scheme):
    """Several vectors at once (each weight row read once for all) give exactly the
    numbers of one vector at a time: each is quantized on its own."""
    from mistral_nemo.quant import quantize_linear

    kind = kernels.WeightKind.INT4 if scheme == "int4" else kernels.WeightKind.INT8
    if not kernels.available(kind):
        pytest.skip("no kernel for this scheme here")
    layer = quantize_linear(torch.randn(300, 576) * 0.02, scheme, 64)
    x = torch.randn(5, 576) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 0.1])[:, None]
    if scheme == "int4":
        args = (layer.weight, layer.scales_zeros, 64)
        got, alone = kernels.gemv_int4(*args, x), [kernels.gemv_int4(*args, r) for r in x]
    else:
        args = (layer.weight, layer.weight_scale)
        got, alone = kernels.gemv_int8(*args, x), [kernels.gemv_int8(*args, r) for r in x]
    assert got.shape == (5, 300)
    assert torch.equal(got, torch.stack(alone))


@pytest.mark.parametrize("cols", [1, 7, 16, 33, 131072])
def test_argmax_is_numpys(cols):
    """First of equal maxima, and a NaN counts as the largest (numpy's rules), wherever in a
    row (first lanes, vector blocks, the tail)."""
    g = torch.Generator().manual_seed(cols)
    x = torch.randint(-3, 4, (12, cols), generator=g).float()  # many ties
    x[1] = -torch.inf
    for row, at in [(2, 0), (3, cols - 1), (4, cols // 2), (5, min(5, cols - 1))]:
        x[row, at] = torch.nan
    x[6, cols // 3 :] = torch.nan
    got = kernels.argmax(x)
    if got is None:
        pytest.skip("no kernels here")
    assert got.tolist() == x.numpy().argmax(-1).tolist()


def test_weight_kinds_are_the_headers():
    """WeightKind takes its values from kernels.h and names every kind there."""
    from mistral_nemo.kernels.header import ffi

    declared = ffi.typeof("enum weight_kind").relements
    assert {f"KIND_{kind.name}": kind.value for kind in kernels.WeightKind} == declared


def test_threads_follow_torch_unless_set():
    try:
        kernels.set_threads(3)
        assert kernels.threads() == 3
        kernels.set_threads(None)
        assert kernels.threads() == torch.get_num_threads()
        with pytest.raises(ValueError):
            kernels.set_threads(0)
    finally:
        kernels.set_threads(None)


def test_scratch_memory_that_cannot_be_had_is_a_memory_error():
    """Eight vectors of 2^50 columns (stride-0 views: nothing is allocated for them) would
    need 2^56 bytes of transposed activations (16 lanes of fp32 per column) on AVX-512, or
    2^55 bytes of bf16 activations widened to fp32 on AVX2: more than any address space."""
    cols = 1 << 50
    if kernels.tiled():
        dtype, needed = torch.float32, 16 * cols * 4
    elif kernels.available(torch.bfloat16):
        dtype, needed = torch.bfloat16, 8 * cols * 4
    else:
        pytest.skip("no vectorized kernel on this machine")
    weight = torch.zeros(1, dtype=dtype).expand(1, cols)
    x = torch.zeros(1, dtype=dtype).expand(8, cols)
    with pytest.raises(MemoryError, match=f"gemv: .* {needed} bytes"):
        kernels.gemv(weight, x)


def test_a_decode_step_without_memory_is_a_memory_error():
    """A decode step at position 2^50 would need petabytes of attention scratch: it raises
    before touching the cache."""
    from mistral_nemo.kernels.decoder import Decoder, KVLayout, LayerSpec, LinearSpec

    if not kernels.available(torch.float32):
        pytest.skip("no vectorized kernel on this machine")
    dim, heads, kv, head_dim, hidden = 64, 2, 1, 32, 128
    layer = LayerSpec(
        attention_norm=torch.ones(dim),
        ffn_norm=torch.ones(dim),
        qkv=[LinearSpec(torch.randn((heads + 2 * kv) * head_dim, dim))],
        wo=LinearSpec(torch.randn(dim, heads * head_dim)),
        gate_up=[LinearSpec(torch.randn(2 * hidden, dim))],
        w2=LinearSpec(torch.randn(dim, hidden)),
    )
    decoder = Decoder([layer], torch.ones(dim), 1e-5, heads, kv, head_dim)
    k, v = torch.zeros(1, kv * head_dim), torch.zeros(1, kv * head_dim)
    pos = 1 << 50
    freqs = torch.ones(1, head_dim // 2, dtype=torch.complex64).expand(pos + 1, -1)
    cache = KVLayout(k, v, slot_stride=kv * head_dim, head_stride=head_dim, freqs=freqs, pos=pos)
    with pytest.raises(MemoryError, match="decode_step"):
        decoder(torch.randn(1, dim), [cache])
    assert not k.any() and not v.any()


def test_fp8_gemv_reads_every_e4m3_value():
    """Every float8_e4m3fn byte but NaN (normals, the 7 subnormals, both zeros, both signs),
    in rows long enough for the vector path and a scalar tail, times bf16 activations."""
    if not kernels.available(torch.float8_e4m3fn):
        pytest.skip("no fp8 kernel on this machine")
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    w = codes.repeat(7).view(torch.float8_e4m3fn).reshape(14, 127)  # 127: 15 x 8 + 7
    x = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(3)).bfloat16()
    expected = F.linear(x.double(), w.double())
    got = kernels.gemv(w.contiguous(), x)
    assert (got.double() - expected).abs().max() <= 1e-5 * (
        w.double().abs() @ x.double().abs()
    ).max()
