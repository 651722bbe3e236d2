"""Byte-level BPE tokenizers of other llama-family models (SmolLM2, Llama 3, ...), as GGUF
files carry them: a token list in GPT-2's byte-to-unicode alphabet, ranked merges and a
named pre-tokenizer. Merging runs in Hugging Face's `tokenizers` library, which merges by
pair rank as llama.cpp does; the chat format is the model's own Jinja template.
"""

from __future__ import annotations

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


def unicode_to_bytes(token: str) -> bytes:
    back = {c: b for b, c in byte_to_unicode().items()}
    try:
        return bytes(back[c] for c in token)
    except KeyError:
        return token.encode("utf-8")  # a control token's name


def bytes_to_unicode(raw: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in raw)


class BPETokenizer(BaseTokenizer):
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
        self.n_words = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self._controls = {i: t for i, t in enumerate(tokens) if token_types[i] == CONTROL}
        self.special_ids = {t: i for i, t in self._controls.items()}
        self._bytes = [
            b"" if i in self._controls else unicode_to_bytes(t) for i, t in enumerate(tokens)
        ]
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        model = BPE(vocab, pairs, ignore_merges=ignore_merges)  # type: ignore[arg-type]
        self._hf = HFTokenizer(model)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        # User-defined tokens are split out of any text, as llama.cpp does; control tokens
        # only come from the chat template.
        user = [t for i, t in enumerate(tokens) if token_types[i] == USER_DEFINED]
        self._hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        names = sorted(self.special_ids, key=len, reverse=True)
        self._control_pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """`bos` adds BOS only where the model's GGUF asks for it (`add_bos_token`)."""
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

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        if tools:
            raise InvalidRequestError(
                "tools are supported for Mistral models only; this model's chat format "
                "has no tool calls"
            )
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template")
        _check_messages(messages)
        text = render_template(
            self.chat_template,
            messages,
            add_generation_prompt=not continue_final_message,
            bos_token=self.control_name(self.bos_id) if self.is_control(self.bos_id) else "",
            eos_token=self.control_name(self.eos_id) if self.is_control(self.eos_id) else "",
        )
        if continue_final_message:
            last = messages[-1].get("content") or ""
            end = text.rfind(last)
            text = text[: end + len(last)] if end >= 0 and last else text
        return self.encode_with_controls(text)

    def token_bytes(self, token_id: int) -> bytes:
        self.check_id(token_id)
        return self._bytes[token_id]

    def is_control(self, token_id: int) -> bool:
        return token_id in self._controls

    def control_name(self, token_id: int) -> str:
        return self._controls[token_id]


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise InvalidRequestError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(
                f"messages[{i}]: role must be system, user or assistant for this model"
            )
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}]: content must be a string for this model")


def render_template(template: str, messages: Sequence[dict[str, Any]], **variables: Any) -> str:
    """A Hugging Face chat template rendered as transformers renders it (sandboxed Jinja,
    trimmed blocks, `raise_exception`, `tojson`, `strftime_now`)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(template).render(messages=list(messages), **variables)
    except TemplateError as e:
        raise InvalidRequestError(f"chat template failed: {e}") from None
