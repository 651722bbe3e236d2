"""The needle-in-a-haystack grid: exact prompt lengths, needle positions, scoring, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_nemo.cli import main
from mistral_nemo.engine import LLM
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.needle import (
    ANSWER_PREFIX,
    INTRO,
    QUESTION,
    Needle,
    auto_lengths,
    build_grid,
    found,
    run_needle,
    save_report,
)
from mistral_nemo.tokenizer import BaseTokenizer, load_tokenizer

DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def tokenizer(tiny_mistral: Path) -> BaseTokenizer:
    return load_tokenizer(tiny_mistral)


@pytest.mark.parametrize("chat", [True, False])
def test_prompts_have_the_stated_length_and_the_needle_at_the_stated_depth(
    tokenizer: BaseTokenizer, chat: bool
) -> None:
    lengths = [150, 300, 1000, 3000]
    cells = build_grid(tokenizer, lengths, DEPTHS, context=4096, chat=chat, samples=2)
    assert [(c.length, c.depth, c.sample) for c in cells] == [
        (n, d, s) for n in lengths for d in DEPTHS for s in range(2)
    ]
    for cell in cells:
        assert len(cell.prompt) == cell.length
        (start, end), (at, after) = cell.context, cell.needle_span
        text = tokenizer.decode
        # The context sits between the instructions and the question...
        assert text(cell.prompt[:start]).endswith(f"{INTRO}\n")
        question = QUESTION.format(key=cell.needle.key)
        assert text(cell.prompt[end:]).startswith(f"\n{question}")
        assert text(cell.prompt).endswith(ANSWER_PREFIX.format(key=cell.needle.key))
        # ...and these tokens, at the stated depth of it, are the needle.
        assert text(cell.prompt[at:after]).strip() == cell.needle.sentence
        assert text(cell.prompt).count(cell.needle.value) == 1
        room = (end - start) - (after - at)
        if cell.depth == 0:
            assert at == start
        elif cell.depth == 1:
            assert after == end
        else:  # at the sentence or line boundary nearest the depth
            assert abs((at - start) - cell.depth * room) <= 16
        assert cell.needle_depth == pytest.approx((at - start) / room)


def test_prefix_up_to_the_needle_is_shared(tokenizer: BaseTokenizer) -> None:
    """Every prompt starts with the same tokens up to its needle (the prefix cache's share)."""
    cells = build_grid(tokenizer, [400, 800], DEPTHS, context=4096)
    longest = max(cells, key=lambda c: c.needle_span[0])
    for cell in cells:
        at = cell.needle_span[0]
        assert cell.prompt[: at - 1] == longest.prompt[: at - 1]


def test_needles_are_seeded() -> None:
    assert Needle.draw(0, 1024, 0.5, 0) == Needle.draw(0, 1024, 0.5, 0)
    drawn = {Needle.draw(seed, 1024, 0.5, 0) for seed in range(20)}
    assert len(drawn) > 15
    needle = Needle.draw(3, 2048, 0.25, 1)
    assert needle.value.isdigit() and len(needle.value) == 7
    assert needle.key in needle.sentence and needle.value in needle.sentence


def test_scoring() -> None:
    assert found(" 4812093.", "4812093")
    assert found("The number is\n  4812093", "4812093")
    assert found("the Crimson  Falcon", "crimson falcon")
    assert not found(" 4812039.", "4812093")
    assert not found(" 4 812 093", "4812093")
    assert not found("", "4812093")


def test_auto_lengths() -> None:
    assert auto_lengths(8168) == [1024, 2048, 4096, 8168]
    assert auto_lengths(131048)[-2:] == [65536, 131048]
    assert auto_lengths(500) == [64, 128, 256, 500]


def test_lengths_beyond_the_context_are_named(tokenizer: BaseTokenizer) -> None:
    with pytest.raises(InvalidRequestError, match=r"length 4089 is beyond .* 4096 tokens"):
        build_grid(tokenizer, [1024, 4089], context=4096, max_tokens=8)
    with pytest.raises(InvalidRequestError, match="length 50 is too short"):
        build_grid(tokenizer, [50], context=4096)
    with pytest.raises(InvalidRequestError, match="depth 1.5"):
        build_grid(tokenizer, [1024], [0.5, 1.5], context=4096)


def test_cli_names_an_over_long_length(
    tiny_mistral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "needle", str(tiny_mistral), "--lengths", "1024,200000"]
    assert main([*argv, "--kv-cache-memory", "16MiB", "--out", str(tmp_path)]) == 1
    assert "length 200000 is beyond the model's context" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_run_writes_json_and_heat_map(tiny_mistral: Path, tmp_path: Path) -> None:
    llm = LLM(tiny_mistral, kv_cache_memory="16MiB")
    report = run_needle(llm, [128, 192], [0.0, 1.0], samples=2, max_tokens=3, progress=False)
    json_path, png_path = save_report(report, tmp_path, "needle-tiny")
    saved = json.loads(json_path.read_text())
    assert saved == report
    assert saved["lengths"] == [128, 192] and saved["depths"] == [0.0, 1.0]
    assert saved["settings"]["kv_cache_dtype"] == "float32" and saved["settings"]["chat"]
    assert len(saved["scores"]) == 2 and all(len(row) == 2 for row in saved["scores"])
    assert len(saved["cells"]) == 4
    for cell in saved["cells"]:
        assert [s["prompt_tokens"] for s in cell["samples"]] == [cell["length"]] * 2
        assert cell["score"] == sum(s["found"] for s in cell["samples"]) / 2
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needle-tiny.json", "needle-tiny.png"]
