"""Tokenizers saved by transformers: `tokenizer.json` (Hugging Face `tokenizers`) with
`tokenizer_config.json` and the chat template, as community fine-tunes of NeMo ship them
in place of `tekken.json`. Encoding and chat rendering follow transformers'
`AutoTokenizer` and `apply_chat_template`; the NeMo tool-call tokens, when the vocabulary
has them, keep their meaning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer.bpe import TemplateTokenizer, unicode_to_bytes

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFTokenizer(TemplateTokenizer):
    """A folder's `tokenizer.json`: a byte-level BPE model (NeMo's, Llama 3's, ...).

    Special added tokens are the control tokens. As in transformers, added tokens, special
    or not, are split out of any text, so a control token's name in a prompt is that token.
    BOS starts a text prompt where the tokenizer adds it itself (its post-processor, or
    `add_bos_token` in the config)."""

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        spec = _read_json(folder / "tokenizer.json")
        if not _is_byte_level(spec.get("decoder")):
            raise CheckpointError(
                f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers are supported "
                f"(NeMo's kind); this one decodes with {_kind(spec.get('decoder'))}"
            )
        config = _read_json(folder / "tokenizer_config.json", missing_ok=True)
        config = {**_read_json(folder / "special_tokens_map.json", missing_ok=True), **config}
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        vocab = {t: i for t, i in backend.get_vocab(with_added_tokens=True).items()}
        pieces = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            pieces[i] = unicode_to_bytes(token)
        controls = {}
        for i, added in backend.get_added_tokens_decoder().items():
            if added.special:
                controls[i], pieces[i] = added.content, b""
            else:
                pieces[i] = added.content.encode()
        named = {n: t for n in _SPECIAL_NAMES if (t := _token_text(config.get(n)))}
        if "bos_token" not in named or "eos_token" not in named:
            raise CheckpointError(f"{folder}: tokenizer_config.json names no BOS or no EOS token")
        bos_id, eos_id = (vocab.get(named[n]) for n in ("bos_token", "eos_token"))
        if bos_id is None or eos_id is None:
            raise CheckpointError(f"{folder}: the BOS or EOS token is not in tokenizer.json")
        adds_bos = bos_id in backend.encode("", add_special_tokens=True).ids
        templates = _chat_templates(folder, config)
        add_bos = bool(config.get("add_bos_token", adds_bos))
        tok = cls(
            backend, controls, pieces, bos_id, eos_id, add_bos, templates.get("default"), named
        )
        tok.templates = templates
        return tok

    templates: dict[str, str]

    def template_for(self, with_tools: bool) -> str | None:
        """As transformers picks among named templates: "tool_use" for a request with tools."""
        if with_tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        return self.chat_template


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _is_byte_level(decoder: Any) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


def _kind(decoder: Any) -> str:
    return f"a {decoder['type']} decoder" if isinstance(decoder, dict) else "no decoder"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """The chat templates by name ("default", maybe "tool_use"), where transformers finds
    them: the config (one, or a list of `{"name", "template"}`), else
    `chat_template.jinja`, else `chat_template.json`."""
    inline = config.get("chat_template")
    if isinstance(inline, list):
        return {t["name"]: t["template"] for t in inline if isinstance(t, dict) and "name" in t}
    if not isinstance(inline, str) and (folder / "chat_template.jinja").is_file():
        inline = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(inline, str):
        inline = _read_json(folder / "chat_template.json", missing_ok=True).get("chat_template")
    return {"default": inline} if isinstance(inline, str) else {}
