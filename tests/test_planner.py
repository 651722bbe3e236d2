import pytest

from mistral_nemo import InvalidRequestError, ModelConfig
from mistral_nemo.cli import main
from mistral_nemo.planner import parse_bytes, plan_memory

GIB = 2**30
NEMO = ModelConfig.preset("nemo-12b")


def test_nemo_128k_kv_is_20_gib_in_bf16_and_10_in_fp8():
    assert plan_memory(NEMO, 131072, 1, "bf16", "bf16").kv_cache == 20 * GIB
    assert plan_memory(NEMO, 131072, 1, "bf16", "fp8").kv_cache == 10 * GIB
    assert plan_memory(NEMO, 131072, 4, "bf16", "bf16").kv_cache == 80 * GIB


def test_weights_follow_the_format():
    bf16 = plan_memory(NEMO, 1024, weights="bf16").weights
    fp8 = plan_memory(NEMO, 1024, weights="fp8").weights
    assert bf16 == NEMO.num_parameters() * 2  # 24.5 GB
    assert 24.4e9 < bf16 < 24.6e9
    # Linear layers halve; the 2 x 131072 x 5120 embedding and LM head stay bf16.
    assert fp8 == bf16 - (bf16 - 2 * 131072 * 5120 * 2 - 2 * 5120 * 81) // 2


def test_fits():
    plan = plan_memory(NEMO, 131072, 1, "fp8", "fp8")
    assert plan.fits(24 * GIB) and not plan_memory(NEMO, 131072).fits(24 * GIB)


def test_cli(capsys):
    assert (
        main(
            [
                "plan",
                "--preset",
                "nemo-12b",
                "--context",
                "131072",
                "--batch",
                "1",
                "--weights",
                "bf16",
                "--kv",
                "bf16",
                "--memory",
                "24GiB",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "KV cache        20.00 GiB" in out and "does NOT fit in 24.0 GiB" in out


@pytest.mark.parametrize(
    "text, value",
    [("4GiB", 4 * GIB), ("512MB", 512 * 2**20), ("1.5g", int(1.5 * GIB)), ("1024", 1024)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_bad_sizes():
    with pytest.raises(InvalidRequestError, match="memory size"):
        parse_bytes("lots")
    with pytest.raises(InvalidRequestError, match="unknown weight format"):
        plan_memory(NEMO, 10, weights="int3")
