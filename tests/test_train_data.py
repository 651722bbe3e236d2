"""Training data: packing, the token cache, exact resume, block-causal document attention,
and SFT loss masks against mistral-common (Tekken) and a ChatML Jinja template."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import pytest
import torch

from mistral_nemo import ModelConfig, Transformer
from mistral_nemo.demo import demo_model_path
from mistral_nemo.tokenizer import SpecialTokenPolicy, Tokenizer, load_tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file
from mistral_nemo.train import data as data_module
from mistral_nemo.train.data import pretraining_data
from mistral_nemo.train.packing import IGNORE, Batch, DataError, epoch_order
from mistral_nemo.train.sft import (
    ChatTemplateError,
    encode_conversation,
    example_of,
    first_conversation,
    sft_data,
    show_masking,
)

mistral = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402


@pytest.fixture(scope="module")
def tekken() -> Tokenizer:
    return Tokenizer.from_file(reference_tekken_file())


@pytest.fixture(scope="module")
def chatml():
    return load_tokenizer(demo_model_path())


@pytest.fixture(scope="module")
def reference():
    return mistral.MistralTokenizer.from_file(
        str(reference_tekken_file()), mode=ValidationMode.finetuning
    )


# -- pre-training corpora ---------------------------------------------------------------------

DOCS_A = "The quick brown fox\njumps over the lazy dog.\n\nA second paragraph, é and 東京.\n"
JSONL_TEXTS = ["Alpha beta gamma delta.", "", "Epsilon zeta eta theta iota kappa."]
DOCS_C = "Lorem ipsum dolor sit amet,\n// consectetur adipiscing elit.\nSed do eiusmod."


@pytest.fixture()
def corpus(tmp_path: Path) -> list[Path]:
    a, b, c = tmp_path / "a.txt", tmp_path / "b.v1.jsonl", tmp_path / "c.txt"
    a.write_text(DOCS_A)
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in JSONL_TEXTS))
    c.write_text(DOCS_C)
    return [a, b, c]


def expected_stream(tok, texts: list[str]) -> list[int]:
    return [i for t in texts if t for i in tok.encode(t, bos=True, eos=True)]


def windows_of(batch: Batch) -> list[tuple[int, ...]]:
    """Each row as the seq_len + 1 tokens it was cut from (inputs, then the last label)."""
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    rows = torch.cat([batch.tokens, batch.labels[:, -1:]], dim=1)
    return [tuple(r) for r in rows.tolist()]


def test_documents_are_joined_with_bos_eos_packed_and_shifted(tekken, corpus, tmp_path):
    stream = expected_stream(tekken, [DOCS_A, *JSONL_TEXTS, DOCS_C])
    seq_len, batch_size = 8, 3
    data = pretraining_data(corpus, tekken, seq_len, batch_size, cache_dir=tmp_path / "cache")
    n = (len(stream) - 1) // seq_len
    assert data.n_sequences == n >= 5
    windows = {tuple(stream[i * seq_len : i * seq_len + seq_len + 1]) for i in range(n)}
    batches = data.batches()
    rows: list[tuple[int, ...]] = []
    while len(rows) < 2 * n:
        batch = next(batches)
        assert batch.documents is None and batch.attention(ModelConfig.preset("tiny")) is None
        assert batch.trained_tokens == batch_size * seq_len
        rows += windows_of(batch)
    first, second = rows[:n], rows[n : 2 * n]
    assert set(first) == windows and set(second) == windows  # each epoch has every sequence
    assert first != second  # in its own order
    order = epoch_order(0, 0, n)
    assert first == [tuple(stream[i * seq_len : i * seq_len + seq_len + 1]) for i in order]


def test_without_cross_document_attention_documents_restart_and_ends_train_nothing(
    tekken, corpus, tmp_path
):
    data = pretraining_data(
        corpus, tekken, 16, 4, cache_dir=tmp_path / "cache", cross_document_attention=False
    )
    batch = next(data.batches())
    assert batch.documents is not None and batch.documents.dtype == torch.int32
    assert (batch.documents[:, 0] == 0).all()
    boundary = batch.documents[:, 1:] != batch.documents[:, :-1]
    assert boundary.any()
    # The token after a boundary is the next document's BOS; the last of a document is not
    # trained to predict it.
    assert (batch.tokens[:, 1:][boundary] == tekken.bos_id).all()
    assert (batch.labels[:, :-1][boundary] == IGNORE).all()
    assert batch.trained_tokens == batch.labels.numel() - int(boundary.sum()) - int(
        (batch.labels[:, -1] == IGNORE).sum()
    )


def test_a_text_file_tokenized_in_chunks_equals_it_whole(tekken, tmp_path, monkeypatch):
    text = (DOCS_A + DOCS_C + "\n\n  indented\n/path/x\nÜber 東京 ½\r\nend") * 5
    path = tmp_path / "long.txt"
    path.write_text(text)
    monkeypatch.setattr(data_module, "TEXT_CHUNK_BYTES", 7)  # cuts through UTF-8 characters
    data = pretraining_data([path], tekken, 4, 1, cache_dir=tmp_path / "cache")
    tokens, _ = data.stream.read(0, len(data.stream))
    assert tokens.tolist() == tekken.encode(text, bos=True, eos=True)


def cache_files(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.tokens")}


def test_token_cache_is_reused_and_invalidated(tekken, chatml, corpus, tmp_path):
    cache = tmp_path / "cache"
    first = pretraining_data(corpus, tekken, 8, 2, cache_dir=cache)
    written = cache_files(cache)
    assert len(written) == 3
    again = pretraining_data(corpus, tekken, 8, 2, cache_dir=cache)
    assert cache_files(cache) == written  # nothing tokenized again
    assert len(again.stream) == len(first.stream)

    a = corpus[0]
    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    pretraining_data(corpus, tekken, 8, 2, cache_dir=cache)
    assert cache_files(cache) == written

    a.write_text("Different words now.\n")
    changed = pretraining_data(corpus, tekken, 8, 2, cache_dir=cache)
    now = cache_files(cache)
    assert [name for name in now if now[name] != written[name]] == [
        name for name in now if name.startswith("a-")
    ]
    new_stream = expected_stream(tekken, ["Different words now.\n", *JSONL_TEXTS, DOCS_C])
    assert changed.stream.read(0, len(changed.stream))[0].tolist() == new_stream

    other = pretraining_data(corpus, chatml, 8, 2, cache_dir=cache)  # another tokenizer
    assert len(cache_files(cache)) == 6
    expected = expected_stream(chatml, ["Different words now.\n", *JSONL_TEXTS, DOCS_C])
    assert other.stream.read(0, len(other.stream))[0].tolist() == expected


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load (weights only), as training checkpoints keep it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_batches(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.tokens, w.tokens) and torch.equal(g.labels, w.labels)
        assert (g.documents is None) == (w.documents is None)
        if g.documents is not None:
            assert torch.equal(g.documents, w.documents)


def check_resume(make) -> None:
    uninterrupted = make().batches()
    want = [next(uninterrupted) for _ in range(9)]
    stopped = make()
    batches = stopped.batches()
    for _ in range(4):
        next(batches)
    state = roundtrip(stopped.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    batches = resumed.batches()
    assert_same_batches([next(batches) for _ in range(5)], want[4:])


def test_resume_continues_exactly_across_epochs(tekken, corpus, tmp_path):
    def make(seq_len=8):
        return pretraining_data(
            corpus,
            tekken,
            seq_len,
            3,
            seed=5,
            cache_dir=tmp_path / "c",
            cross_document_attention=False,
        )

    assert 2 * make().n_sequences < 9 * 3  # the 9 batches run through two epochs
    check_resume(make)
    with pytest.raises(DataError, match="seq_len"):
        make(seq_len=6).load_state_dict(make().state_dict())


def test_sft_resume_continues_exactly(tekken, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS * 3))

    def make():
        return sft_data([path], tekken, 320, 2, seed=3, cross_document_attention=False)

    check_resume(make)


# -- document attention -------------------------------------------------------------------


def test_document_attention_equals_each_document_alone():
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(config).float().eval()
    lengths = [[5, 7, 4], [9, 7], [16]]
    tokens = torch.randint(0, 512, (len(lengths), 16))
    documents = torch.tensor(
        [[d for d, n in enumerate(row) for _ in range(n)] for row in lengths], dtype=torch.int32
    )
    batch = Batch(tokens, tokens, documents)
    with torch.no_grad():
        packed = model(tokens, 0, batch.attention(config))
        crossing = model(tokens)
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(tokens[r : r + 1, start : start + n])[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=0)
                start += n
    # Without the mask the later documents see the earlier ones.
    assert (crossing[0, 5:] - packed[0, 5:]).abs().max() > 1e-3


# -- SFT masks ----------------------------------------------------------------------------


def fn(name: str, description: str, properties: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties},
        },
    }


def call(id_: str, name: str, arguments: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOLS = [
    fn("get_weather", "Current weather of a city", {"city": {"type": "string"}}),
    fn("web_search", "Search the web", {"query": {"type": "string"}}),
]
WITH_TOOLS = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris, and any news?"},
        {
            "role": "assistant",
            "tool_calls": [
                call("abcDEF123", "get_weather", '{"city": "Paris"}'),
                call("xyz987QWE", "web_search", '{"query": "news"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"celsius": 21}'},
        {"role": "tool", "tool_call_id": "xyz987QWE", "content": "Nothing new."},
        {"role": "assistant", "content": "21 °C in Paris; no news."},
        {"role": "user", "content": "Thanks! And Rome?"},
        {"role": "assistant", "tool_calls": [call("rom123ABC", "get_weather", '{"city": "Rome"}')]},
    ],
}
MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4. "},
    ]
}
CONVERSATIONS = [WITH_TOOLS, MULTI_TURN]


def reference_encoding(reference, conversation):
    request = ChatCompletionRequest.from_openai(
        messages=copy.deepcopy(conversation["messages"]),
        tools=copy.deepcopy(conversation.get("tools")),
    )
    ids = reference.encode_chat_completion(request).tokens
    assistant = [
        reference.instruct_tokenizer.encode_assistant_message(m, is_before_last_user_message=False)
        for m in request.messages
        if m.role == "assistant"
    ]
    return ids, [i for ids_ in assistant for i in ids_]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["tools", "multi-turn"])
def test_tekken_masks_train_exactly_the_assistant_turns(tekken, reference, conversation):
    encoded = encode_conversation(tekken, conversation)
    ids, assistant_ids = reference_encoding(reference, conversation)
    assert encoded.ids == ids
    assert [i for i, t in zip(encoded.ids, encoded.trained, strict=True) if t] == assistant_ids
    assert assistant_ids[-1] == tekken.eos_id


def test_tekken_tool_call_span_includes_the_control_token(tekken):
    encoded = encode_conversation(tekken, WITH_TOOLS)
    calls = tekken.control_id("[TOOL_CALLS]")
    at = [i for i, token in enumerate(encoded.ids) if token == calls]
    assert len(at) == 2 and all(encoded.trained[i] for i in at)
    results = tekken.control_id("[TOOL_RESULTS]")
    assert not any(t for i, t in zip(encoded.ids, encoded.trained, strict=True) if i == results)


def test_show_masking_marks_the_trained_text(tekken, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + json.dumps(MULTI_TURN) + "\n{not json\n")
    shown = show_masking(tekken, first_conversation(path))
    assert shown.startswith(
        "<s>[INST]Hi[/INST][[Hello there!</s>]][INST]What is 2 + 2?[/INST][[4.</s>]]\n\n"
    )
    assert "trained" in shown.splitlines()[-1]
    assert "\x1b[1;32mHello there!</s>\x1b[0m" in show_masking(tekken, MULTI_TURN, color=True)
    path.write_text("{not json\n" + json.dumps(MULTI_TURN) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: invalid JSON"):
        first_conversation(path)


def test_chatml_template_masks_assistant_content_and_end(chatml):
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    encoded = encode_conversation(chatml, conversation)
    end = chatml.id_to_piece(chatml.eos_id)
    assert end == "<|im_end|>"
    runs = [
        chatml.decode([token for token, _ in run], SpecialTokenPolicy.KEEP)
        for trained, run in groupby(
            zip(encoded.ids, encoded.trained, strict=True), key=itemgetter(1)
        )
        if trained
    ]
    assert runs == [f"Hello!{end}", f"4{end}"]
    # Everything before the first answer is the prompt the model's own encode_chat writes.
    prompt = chatml.encode_chat(conversation["messages"][:2])
    assert encoded.ids[: len(prompt)] == prompt and not any(encoded.trained[: len(prompt)])
    assert encoded.trained[len(prompt)]


def test_templates_that_hide_the_assistant_turns_are_refused(chatml, tmp_path):
    conversation = MULTI_TURN
    relabels_last = copy.copy(chatml)
    relabels_last.chat_template = (
        "{% for m in messages %}<|im_start|>{{ 'final' if loop.last else m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="cannot be located"):
        encode_conversation(relabels_last, conversation)
    no_eos = copy.copy(chatml)
    no_eos.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(conversation) + "\n")
    # The template, not the line, is at fault: fatal even when bad lines are skipped.
    with pytest.raises(ChatTemplateError, match=r"chat\.jsonl:1: .*never learn to stop"):
        sft_data([path], no_eos, 64, 1, bad_lines="skip")
    with pytest.raises(DataError, match="no tools"):
        encode_conversation(chatml, {**MULTI_TURN, "tools": TOOLS})


def test_sft_rows_pack_conversations_and_truncate_long_ones(tekken, tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    examples = [example_of(encode_conversation(tekken, c)) for c in CONVERSATIONS]
    data = sft_data([path], tekken, 300, 1, cross_document_attention=False)
    batch = next(data.batches())
    order = epoch_order(0, 0, 2)
    inputs = [i for k in order for i in examples[k].inputs.tolist()]
    labels = [i for k in order for i in examples[k].labels.tolist()]
    assert batch.tokens[0, : len(inputs)].tolist() == inputs
    assert batch.labels[0].tolist() == labels + [IGNORE] * (300 - len(labels))
    assert batch.documents is not None
    first = len(examples[order[0]].inputs)
    assert set(batch.documents[0, :first].tolist()) == {0}
    assert set(batch.documents[0, first : len(inputs)].tolist()) == {1}

    short = len(examples[1].inputs) - 3
    with caplog.at_level(logging.WARNING, logger="mistral_nemo.train"):
        truncated = sft_data([path], tekken, short, 2)
    assert "2 conversations longer than" in caplog.text
    assert next(truncated.batches()).tokens.shape == (2, short)


def test_bad_lines_are_reported_with_their_line_numbers(tekken, tmp_path, caplog):
    bad_arguments = copy.deepcopy(WITH_TOOLS)
    bad_arguments["messages"][-1]["tool_calls"][0]["function"]["arguments"] = '{"city": Rome'
    lines = [
        json.dumps(MULTI_TURN),
        "{not json",
        json.dumps({"conversation": []}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps(bad_arguments),
        "",
        json.dumps(WITH_TOOLS),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="mistral_nemo.train"):
        data = sft_data([path], tekken, 512, 1)
    assert data.identity()["conversations"] == 2
    for line, reason in [
        (2, "invalid JSON"),
        (3, 'missing "messages"'),
        (4, "no assistant turn"),
        (5, "messages[7].tool_calls[0].function.arguments: not JSON"),
    ]:
        assert f"bad.jsonl:{line}: {reason}" in caplog.text
    assert "skipped 4 bad lines" in caplog.text
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        sft_data([path], tekken, 512, 1, bad_lines="error")


def test_bad_corpus_lines_are_remembered_by_the_cache(tekken, tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "One document."}\n{"txt": "misnamed"}\n{"text": "Two."}\n')
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="mistral_nemo.train"):
        data = pretraining_data([path], tekken, 4, 1, cache_dir=cache)
    assert 'docs.jsonl:2: expected an object with a string "text" field' in caplog.text
    assert len(data.stream) == len(expected_stream(tekken, ["One document.", "Two."]))
    with pytest.raises(DataError, match=r"docs\.jsonl:2: expected an object"):
        pretraining_data([path], tekken, 4, 1, cache_dir=cache, bad_lines="error")
