"""Checkpoints with a tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json,
the chat template) in place of tekken.json, and checkpoints with no tokenizer at all."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from test_chat_format import CONVERSATIONS, TOOLS

from mistral_nemo import InvalidRequestError
from mistral_nemo.checkpoint import convert_checkpoint
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer import Tokenizer, load_tokenizer
from mistral_nemo.tokenizer.files import reference_tekken_file
from mistral_nemo.tokenizer.hf_files import HFTokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "Ünïcödé: 日本語のテキスト, emoji 🤖🚀, Ελληνικά, العربية",
    "def f(x):\n    return x ** 2  # code\n",
    "[INST] looks like a control token [/INST] </s>",
    "1234567890 3.14159 -42",
]


def _weights_only(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder without its tokenizer."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tekken.json"))
    return dst


@pytest.fixture(scope="module")
def hf_nemo(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with NeMo's vocabulary as transformers writes it (HF's converter from
    tekken.json, the chat template mistral-common generates), and no tekken.json."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    folder = _weights_only(tiny_hf, tmp_path_factory.mktemp("hf-nemo") / "model")
    convert_tekken_tokenizer(str(reference_tekken_file())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def theirs(hf_nemo: Path):
    return transformers.AutoTokenizer.from_pretrained(hf_nemo)


@pytest.fixture(scope="module")
def ours(hf_nemo: Path) -> HFTokenizer:
    tok = load_tokenizer(hf_nemo)
    assert isinstance(tok, HFTokenizer)
    return tok


def transformers_ids(theirs, messages, tools, cont):
    return theirs.apply_chat_template(
        copy.deepcopy(messages),
        tools=copy.deepcopy(tools),
        add_generation_prompt=not cont,
        continue_final_message=cont,
        tokenize=True,
        return_dict=False,
    )


@pytest.mark.parametrize(
    "name, messages, tools, cont", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS]
)
def test_chats_encode_as_transformers(ours, theirs, name, messages, tools, cont):
    """Every conversation of the instruct-format suite (tools, tool results, chunks,
    continue_final_message): the same ids as `apply_chat_template`, or both refuse."""
    try:
        expected = transformers_ids(theirs, messages, tools, cont)
    except Exception:  # the template raised: ours must refuse it too
        with pytest.raises(InvalidRequestError):
            ours.encode_chat(messages, tools, continue_final_message=cont)
        return
    assert ours.encode_chat(messages, tools, continue_final_message=cont) == expected


def test_text_matches_transformers_and_tekken(ours, theirs):
    """The same vocabulary as tekken.json: the same ids as transformers and as Tekken for
    ordinary text, and the same text back."""
    tekken = Tokenizer.from_file(reference_tekken_file())
    for text in TEXTS[:4] + TEXTS[5:]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids
        assert ids == tekken.encode(text)
        assert ours.decode(ids) == text
    # As in transformers, a control token's name in the text is that token.
    assert ours.encode(TEXTS[4]) == theirs(TEXTS[4], add_special_tokens=False).input_ids
    assert ours.control_id("[INST]") in ours.encode(TEXTS[4])
    assert (ours.bos_id, ours.eos_id, ours.n_words) == (1, 2, tekken.n_words)
    assert ours.encode("hi", bos=True) == theirs("hi").input_ids  # this one adds no BOS


def test_inline_and_named_templates(hf_nemo: Path, tmp_path: Path, theirs):
    """The chat template inline in tokenizer_config.json (as HF's NeMo repos ship it), and
    named templates, "tool_use" chosen when there are tools."""
    inline = _weights_only(hf_nemo, tmp_path / "inline")
    template = (inline / "chat_template.jinja").read_text()
    (inline / "chat_template.jinja").unlink()
    config = json.loads((inline / "tokenizer_config.json").read_text())
    (inline / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    assert load_tokenizer(inline).encode_chat(messages, TOOLS) == transformers_ids(
        theirs, messages, TOOLS, False
    )
    named = [
        {"name": "default", "template": "plain {{ messages[0].content }}"},
        {"name": "tool_use", "template": "{{ tools | length }} tools {{ messages[0].content }}"},
    ]
    (inline / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tok = load_tokenizer(inline)
    assert tok.decode(tok.encode_chat(messages)) == "plain Weather in Paris?"
    assert tok.decode(tok.encode_chat(messages, TOOLS)) == f"{len(TOOLS)} tools Weather in Paris?"


def test_tekken_json_wins_and_keeps_mistral_common_ids(tiny_hf: Path, hf_nemo: Path, tmp_path):
    both = _weights_only(hf_nemo, tmp_path / "both")
    shutil.copy(tiny_hf / "tekken.json", both / "tekken.json")
    tok = load_tokenizer(both)
    assert isinstance(tok, Tokenizer)
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ref = MistralTokenizer.from_file(str(both / "tekken.json"))
    assert tok.encode(TEXTS[2], bos=True) == ref.instruct_tokenizer.tokenizer.encode(
        TEXTS[2], bos=True, eos=False
    )


def test_llm_chats_with_an_hf_tokenizer(hf_nemo: Path, tiny_hf: Path):
    """The engine runs such a folder; with the same weights and vocabulary it generates
    what the tekken.json folder generates for the same ids."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    llm = LLM(hf_nemo, kv_cache_memory="8MiB")
    out = llm.chat([{"role": "user", "content": "Hello"}], greedy)[0]
    prompt = out.prompt_token_ids
    assert prompt == load_tokenizer(tiny_hf).encode_chat([{"role": "user", "content": "Hello"}])
    reference = LLM(tiny_hf, kv_cache_memory="8MiB").generate([prompt], greedy)[0]
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert out.outputs[0].text == reference.outputs[0].text


def test_no_tokenizer_runs_on_token_ids(tiny_hf: Path, tmp_path: Path):
    bare = _weights_only(tiny_hf, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no tokenizer found.*skip_tokenizer_init=True"):
        LLM(bare, kv_cache_memory="8MiB")
    llm = LLM(bare, kv_cache_memory="8MiB", skip_tokenizer_init=True)
    assert llm.tokenizer is None
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    ids = [1, 1091, 1044, 3]
    out = llm.generate([ids], greedy)[0].outputs[0]
    reference = LLM(tiny_hf, kv_cache_memory="8MiB").generate([ids], greedy)[0].outputs[0]
    assert out.token_ids == reference.token_ids and len(out.token_ids) == 5
    assert out.text == ""
    with pytest.raises(InvalidRequestError, match="pass token ids"):
        llm.generate("text", greedy)


def test_missing_path_says_so(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_tokenizer(tmp_path / "nowhere")


def test_convert_carries_tokenizer_files(hf_nemo: Path, tmp_path: Path):
    convert_checkpoint(hf_nemo, tmp_path / "mistral", "mistral")
    convert_checkpoint(tmp_path / "mistral", tmp_path / "hf", "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_nemo / name).read_bytes()
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)


def test_unsupported_tokenizer_json_is_named(hf_nemo: Path, tmp_path: Path):
    folder = _weights_only(hf_nemo, tmp_path / "sp")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="only byte-level BPE.*Metaspace"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot be read as JSON"):
        load_tokenizer(folder)
