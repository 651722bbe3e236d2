"""Tekken on tiktoken against mistral-common's Tekkenizer, on the real NeMo tokenizer file."""

from __future__ import annotations

import re

import pytest
from data.multilingual import CODE, PROSE

from mistral_nemo import CheckpointError, InvalidRequestError
from mistral_nemo.tokenizer import SpecialTokenPolicy, Tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file

tekken = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy as RefPolicy  # noqa: E402


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


@pytest.fixture(scope="module")
def ref():
    return tekken.Tekkenizer.from_file(reference_tekken_file())


EDGE_CASES = [
    "",
    " ",
    "\n",
    "a",
    "    leading spaces",
    "trailing spaces    ",
    "tabs\tand\t\tmore\t\t\ttabs",
    "many     spaces     between      words",
    "\n\n\n\nblank lines\n\n\n",
    "windows\r\nline\r\nendings\r\n",
    "old mac\rline endings\r",
    "mixed \r\n\n\r endings",
    "control \x00 \x01 \x07 \x1b[31mred\x1b[0m \x7f chars",
    "bell\aand form\ffeed\vvertical",
    "\ufeffbyte order mark",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "right-to-left \u202eoverride\u202c and \u200fmark",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏽‍💻 coder, 🧑‍🤝‍🧑 people",
    "🤷🏽‍♀️🤷🏿‍♂️🙋‍♀️ and keycaps 1️⃣2️⃣#️⃣ and flags 🇫🇷🇯🇵🇧🇷",
    "😀😃😄😁😆😅😂🤣🥲☺️😊😇🙂🙃😉😌😍🥰😘",
    "combining: e\u0301 a\u0300 n\u0303 o\u0308 (decomposed) vs é à ñ ö",
    "Zalgo: Z̷̢̛̖a̸̡͙l̴̰̈g̵̣̊o̶̤͝",
    "digits 0123456789 and 3.14159 and 1,000,000 and 1e-5 and ١٢٣ and ๑๒๓",
    "math: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ = ∫ f(x) dx ≈ π ≠ ∞",
    "currency: $100 €50 £20 ¥1000 ₹500 ₩10000 ₿0.01",
    "URL https://example.com/path?q=a%20b&x=1#frag and email a.b+c@example.org",
    "[INST] looks like a control token [/INST] </s> <s> [TOOL_CALLS] <unk> <SPECIAL_20>",
    "<|endoftext|> <|im_start|>user<|im_end|>",
    'JSON {"key": [1, 2, {"nested": null}], "ü": "\\u00fc"}',
    "Mixed: Hello Привет Γειά 你好 こんにちは 안녕하세요 مرحبا שלום नमस्ते สวัสดี",
    "ALL CAPS SHOUTING AND camelCaseIdentifiers and snake_case_names and kebab-case",
    "repeated " * 50,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@",
    "private use \ue000\uf8ff and supplementary 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 𐍈",
    "noncharacters \ufffe\uffff and replacement \ufffd",
]


def corpus() -> list[str]:
    texts = list(EDGE_CASES)
    for _script, text in PROSE.values():
        texts.append(text)
        paragraphs = text.split("\n\n")
        texts += paragraphs
        for p in paragraphs:
            texts += [s for s in re.split(r"(?<=[.!?।。？！])\s*", p) if s]
    for code in CODE.values():
        texts.append(code)
        texts += code.split("\n\n")
    everything = "\n\n".join(t for _, t in PROSE.values()) + "".join(CODE.values())
    big = (everything * (20_000 // len(everything) + 1))[:20_000]
    texts.append(big)  # a 20 KB text
    return texts


CORPUS = corpus()


def test_corpus_covers_what_it_should():
    assert len(CORPUS) >= 200
    assert len({script for script, _ in PROSE.values()}) >= 15
    assert len(CODE) >= 5
    assert max(len(t) for t in CORPUS) >= 20_000


def test_encode_matches_mistral_common_byte_for_byte(ours, ref):
    mismatches = [t for t in CORPUS if ours.encode(t) != ref.encode(t, bos=False, eos=False)]
    assert not mismatches, mismatches[:3]
    for text in CORPUS[:50]:
        assert ours.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)


def test_decode_inverts_encode(ours, ref):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.decode(ids) == ref.decode(ids)


def test_batch_encode_equals_single(ours):
    assert ours.encode_batch(CORPUS, bos=True) == [ours.encode(t, bos=True) for t in CORPUS]


def test_partial_utf8_is_decoded_like_mistral_common(ours, ref):
    ids = ours.encode("日本語 😀 Ωμέγα ❤️")
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert ours.decode(ids[i:j]) == ref.decode(ids[i:j])
    # A control token between the bytes of one character splits it, as in mistral-common.
    emoji = ours.encode("😀")
    assert len(emoji) > 1
    cut = [emoji[0], ours.bos_id, *emoji[1:]]
    for policy, ref_policy in (
        (SpecialTokenPolicy.IGNORE, RefPolicy.IGNORE),
        (SpecialTokenPolicy.KEEP, RefPolicy.KEEP),
    ):
        assert ours.decode(cut, policy) == ref.decode(cut, ref_policy)
        assert "\ufffd" in ours.decode(cut, policy)


def test_stream_decoder_holds_back_cut_characters(ours):
    text = "naïve 日本語 😀👨‍👩‍👧 done"
    ids = ours.encode(text)
    stream = ours.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_control_tokens_and_ids(ours, ref):
    assert (
        (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id)
        == (ref.bos_id, ref.eos_id, ref.pad_id, ref.unk_id)
        == (1, 2, 11, 0)
    )
    assert ours.n_words == ref.n_words == 131072
    assert ours.num_special == 1000
    for name in (
        "[INST]",
        "[/INST]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[TOOL_CALLS]",
        "<pad>",
        "[IMG]",
        "[PREFIX]",
        "[MIDDLE]",
        "[SUFFIX]",
        "[SYSTEM_PROMPT]",
        "<SPECIAL_20>",
        "<SPECIAL_999>",
    ):
        assert ours.control_id(name) == ref.get_special_token(name), name
    for i in (0, 1, 9, 19, 20, 999, 1000, 1255, 1256, 131071):
        assert ours.id_to_piece(i) == ref.id_to_piece(i)
    with pytest.raises(KeyError, match="not a control token"):
        ours.control_id("[THINK]")


def test_user_text_never_becomes_control_tokens(ours):
    for text in ("[INST]", "</s>", "<s>", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "<SPECIAL_42>"):
        ids = ours.encode(text)
        assert all(i >= ours.num_special for i in ids)
        assert ours.decode(ids) == text


def test_decode_policies(ours, ref):
    ids = [1, 22177, 3, 1044, 2]
    assert ours.decode(ids) == ref.decode(ids) == "Hello,"
    assert ours.decode(ids, SpecialTokenPolicy.KEEP) == "<s>Hello[INST],</s>"
    with pytest.raises(InvalidRequestError, match="control token 1"):
        ours.decode(ids, SpecialTokenPolicy.RAISE)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        ours.decode([131072])


def test_from_pretrained_and_bad_files(tmp_path, tiny_mistral):
    assert Tokenizer.from_pretrained(tiny_mistral).n_words == 131072
    with pytest.raises(CheckpointError, match="no tekken.json"):
        Tokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "tekken.json"
    bad.write_text('{"config": {}}')
    with pytest.raises(CheckpointError, match="not a valid tekken.json"):
        Tokenizer.from_pretrained(tmp_path)
    bad.write_text("{truncated")
    with pytest.raises(CheckpointError, match="not a valid tekken.json"):
        Tokenizer.from_file(bad)
