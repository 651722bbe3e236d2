import pytest

from mistral_nemo import InvalidRequestError, ModelConfig
from mistral_nemo.cli import main
from mistral_nemo.planner import parse_bytes, plan_memory, plan_training

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


def test_full_fine_tuning_takes_16_bytes_a_parameter_split_over_the_ranks():
    one = plan_training(NEMO, 4096)
    params = NEMO.num_parameters()
    assert one.weights + one.gradients + one.optimizer == pytest.approx(16 * params, rel=1e-6)
    eight = plan_training(NEMO, 4096, dp=8)
    assert eight.optimizer == one.optimizer // 8 and eight.working < one.working
    assert eight.activations == one.activations  # data parallelism does not split a batch
    both = plan_training(NEMO, 4096, dp=4, tp=2)
    assert both.weights == eight.weights and both.activations < one.activations


def test_checkpointing_and_sequence_parallel_cut_activations():
    plain = plan_training(NEMO, 4096).activations
    checkpointed = plan_training(NEMO, 4096, activation_checkpointing=True).activations
    assert checkpointed < plain / 4
    tp = plan_training(NEMO, 4096, tp=2).activations
    sp = plan_training(NEMO, 4096, tp=2, sequence_parallel=True).activations
    assert sp < tp < plain


def test_qlora_of_nemo_fits_a_24_gib_gpu():
    plan = plan_training(NEMO, 4096, lora_rank=16, base="int4", activation_checkpointing=True)
    assert plan.fits(24 * GIB) and plan.optimizer < GIB
    assert not plan_training(NEMO, 4096, dp=8).fits(24 * GIB)


def test_cli_plans_training(capsys):
    args = ["plan", "--train", "--context", "4096", "--dp", "8", "--memory", "80GiB"]
    assert main([*args, "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "optimizer" in out and "working" in out and "fits in 80.0 GiB" in out
