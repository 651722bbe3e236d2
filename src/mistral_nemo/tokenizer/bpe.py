"""Byte-level BPE tokenizers of other llama-family models (SmolLM2, Llama 3, ...), as GGUF
files carry them: a token list in GPT-2's byte-to-unicode alphabet, ranked merges and a
named pre-tokenizer. Merging runs in Hugging Face's `tokenizers` library, which merges by
pair rank as llama.cpp does; the chat format is the model's own Jinja template.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from mistral_nemo.errors import CheckpointError, InvalidRequestError
from mistral_nemo.tokenizer.base import BaseTokenizer

# llama.cpp's pre-tokenizers by GGUF name: regexes applied one after the other, each over
# the pieces the previous one made (llama-vocab.cpp), and whether a word that is already a
# token skips the merges (`ignore_merges`).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
    "starcoder": ((r"\p{N}", _GPT2), False),
    "llama-bpe": ((_LLAMA3,), True),
    "llama3": ((_LLAMA3,), True),
}

# Token types of GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 maps to itself, the other
    bytes to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def unicode_to_bytes(token: str) -> bytes:
    back = _unicode_to_byte()
    try:
        return bytes(back[c] for c in token)
    except KeyError:
        return token.encode("utf-8")  # a control token's name


def bytes_to_unicode(raw: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in raw)


class TemplateTokenizer(BaseTokenizer):
    """A byte-level BPE vocabulary merged by Hugging Face's `tokenizers` (`hf`), whose chat
    format is a Jinja template rendered as transformers renders it. `controls` are the
    control tokens by id, `pieces` the bytes of every id (empty for controls) and
    `template_tokens` the special tokens the template sees by name (`bos_token`, ...)."""

    def __init__(
        self,
        hf: Any,
        controls: dict[int, str],
        pieces: list[bytes],
        bos_id: int,
        eos_id: int,
        add_bos: bool,
        chat_template: str | None,
        template_tokens: dict[str, str],
    ) -> None:
        self._hf = hf
        self._controls = controls
        self._bytes = pieces
        self.n_words = len(pieces)
        self.special_ids = {t: i for i, t in controls.items()}
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.template_tokens = template_tokens
        names = sorted(self.special_ids, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """`bos` adds BOS only where the tokenizer itself adds it (`add_bos`)."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.add_bos) + ids + [self.eos_id] * eos

    def encode_with_controls(self, text: str) -> list[int]:
        """Ids of text in which control token names stand for the tokens (a rendered chat
        template), the rest encoded as ordinary text."""
        if self._control_pattern is None:
            return self.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._control_pattern.finditer(text):
            ids += self.encode(text[pos : m.start()])
            ids.append(self.special_ids[m.group()])
            pos = m.end()
        return ids + self.encode(text[pos:])

    def template_for(self, with_tools: bool) -> str | None:
        """The chat template for a request with or without tools."""
        return self.chat_template

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template renders tool definitions (others would drop them)."""
        template = self.template_for(True)
        return template is not None and "tools" in template_variables(template)

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        return self.encode_with_controls(
            self.render_chat(messages, tools, not continue_final_message, continue_final_message)
        )

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """The conversation as the chat template writes it, as transformers'
        `apply_chat_template(..., tokenize=False)` does: keys whose value is None dropped,
        special tokens by name, `continue_final_message` cut after the last message's text."""
        template = self.template_for(bool(tools))
        if template is None:
            raise InvalidRequestError("this model has no chat template")
        if tools and not self.takes_tools:
            raise InvalidRequestError(
                "this model's chat template takes no tools; it would drop their definitions"
            )
        messages = _normalized(messages)
        if continue_final_message:
            _tag_final_text(messages)
        variables: dict[str, Any] = dict(self.template_tokens)
        if tools:
            variables["tools"] = list(tools)
        text = render_template(
            template, messages, add_generation_prompt=add_generation_prompt, **variables
        )
        if continue_final_message:
            at = text.rfind(_CONTINUE_TAG.strip())
            if at < 0:
                raise InvalidRequestError(
                    "continue_final_message: the chat template does not write the final message"
                )
            text = text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()
        return text

    def token_bytes(self, token_id: int) -> bytes:
        self.check_id(token_id)
        return self._bytes[token_id]

    def is_control(self, token_id: int) -> bool:
        return token_id in self._controls

    def control_name(self, token_id: int) -> str:
        return self._controls[token_id]


class BPETokenizer(TemplateTokenizer):
    """A GGUF file's byte-level BPE tokenizer: its token list, types, ranked merges and a
    pre-tokenizer named by llama.cpp."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        pre: str,
        bos_id: int,
        eos_id: int,
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        from tokenizers import AddedToken, Regex, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(
                f"pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}"
            )
        regexes, ignore_merges = PRE_TOKENIZERS[pre]
        controls = {i: t for i, t in enumerate(tokens) if token_types[i] == CONTROL}
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(BPE(vocab, pairs, ignore_merges=ignore_merges))  # type: ignore[arg-type]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        # User-defined tokens are split out of any text, as llama.cpp does; control tokens
        # only come from the chat template.
        user = [t for i, t in enumerate(tokens) if token_types[i] == USER_DEFINED]
        hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        pieces = [b"" if i in controls else unicode_to_bytes(t) for i, t in enumerate(tokens)]
        named = {"bos_token": controls.get(bos_id, ""), "eos_token": controls.get(eos_id, "")}
        super().__init__(hf, controls, pieces, bos_id, eos_id, add_bos, chat_template, named)


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _normalized(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of the messages without keys whose value is None (templates handle a missing
    key, not a None one)."""
    if not messages:
        raise InvalidRequestError("messages: the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}]: must be an object with a string role")
        out.append(copy.deepcopy({k: v for k, v in m.items() if v is not None}))
    return out


def _tag_final_text(messages: list[dict[str, Any]]) -> None:
    """Mark where the final message's text ends, so the rendering can be cut there."""
    content = messages[-1].get("content")
    if isinstance(content, str):
        messages[-1]["content"] = content + _CONTINUE_TAG
        return
    for block in reversed(content if isinstance(content, list) else []):
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            block["text"] += _CONTINUE_TAG
            return
    raise InvalidRequestError("continue_final_message: the final message has no text to continue")


@lru_cache(maxsize=8)
def template_variables(template: str) -> frozenset[str]:
    """The names a chat template reads from its caller."""
    from jinja2 import Environment, meta

    return frozenset(meta.find_undeclared_variables(Environment().parse(template)))


def render_template(template: str, messages: Sequence[dict[str, Any]], **variables: Any) -> str:
    """A Hugging Face chat template rendered as transformers renders it (sandboxed Jinja,
    trimmed blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template: {message}")

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    try:
        return env.from_string(template).render(messages=list(messages), **variables)
    except (TemplateError, TypeError) as e:  # TypeError: e.g. None content added to a string
        raise InvalidRequestError(f"chat template failed: {e}") from None
