"""Structured outputs: generation held to a JSON schema, any JSON object, a regular
expression, a choice among strings or a Lark grammar, by masking at every step the tokens
that cannot continue a valid output.

llguidance computes the masks (an Earley parser with a lexer over the token trie). Measured
on our vocabularies (`benchmarks/structured_speed.py`): a mask takes ~10 µs (median) and a
JSON schema compiles in ~1 ms; xgrammar's masks take ~2 µs and its compile ~17 ms. Both are
far below a decode step (22 ms at batch 1 on the demo model). llguidance was picked because
it is a 3 MB wheel with no dependencies, where xgrammar requires transformers and triton,
and because mistral-common uses it for Tekken too.

Control tokens take part in grammars by name in angle brackets (`<TOOL_CALLS>` for
Tekken's `[TOOL_CALLS]`), as llguidance names special tokens.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch

from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.tokenizer.base import BaseTokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # typing only (declared in its .pyi)

# JSON laid out as json.dumps lays it out by default (the way the model saw JSON in
# training, tool calls included), which also keeps the output from padding itself with
# whitespace without end.
_JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@dataclass(frozen=True)
class Guidance:
    """What a completion must match: exactly one of the fields (vLLM's guided_* fields)."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark syntax, as llguidance reads it

    def __post_init__(self) -> None:
        given = [
            self.json_schema is not None,
            self.json_object,
            self.regex is not None,
            self.choice is not None,
            self.grammar is not None,
        ]
        if sum(given) != 1:
            raise InvalidRequestError(
                "a guided request takes exactly one of json_schema, json_object, regex, "
                "choice and grammar"
            )
        if self.choice is not None and not self.choice:
            raise InvalidRequestError("guided choice needs at least one string")

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar."""
        if self.json_schema is not None or self.json_object:
            schema = self.json_schema if self.json_schema is not None else {"type": "object"}
            return json_grammar(schema)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_regex(
                "|".join(re.escape(c) for c in self.choice)
            )
        assert self.grammar is not None
        return llguidance.LLMatcher.grammar_from_lark(self.grammar)


def json_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for JSON matching `schema`, laid out as json.dumps does."""
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT)
    except ValueError as e:
        raise InvalidRequestError(f"invalid JSON schema: {e}") from None


def json_lark(schema: dict[str, Any]) -> str:
    """A Lark rule body matching JSON of `schema`, to embed in a larger Lark grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_LAYOUT})


# One llguidance tokenizer per (tokenizer, vocabulary size): building it takes ~1 s.
_LLG_TOKENIZERS: weakref.WeakKeyDictionary[BaseTokenizer, dict[int, llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)


def llg_tokenizer(tokenizer: BaseTokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` over a model's `vocab_size` logits (ids past the
    tokenizer's own are never allowed)."""
    by_size = _LLG_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in by_size:
        by_size[vocab_size] = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(VocabularyView(tokenizer)), n_vocab=vocab_size
        )
    return by_size[vocab_size]


class VocabularyView:
    """What llguidance's TokenizerWrapper reads of a tokenizer: every token's bytes (a
    control token as its name in angle brackets), the control ids, BOS / EOS, and encoding."""

    def __init__(self, tokenizer: BaseTokenizer) -> None:
        self._tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id
        self.special_token_ids = [i for i in range(tokenizer.n_words) if tokenizer.is_control(i)]
        self.tokens = [
            _control_name(tokenizer.control_name(i)).encode()
            if tokenizer.is_control(i)
            else tokenizer.token_bytes(i)
            for i in range(tokenizer.n_words)
        ]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


def _control_name(name: str) -> str:
    """`[TOOL_CALLS]` -> `<TOOL_CALLS>`; names already in angle brackets stay."""
    inner = name[1:-1] if name[:1] + name[-1:] in ("[]", "<>") else name
    return f"<{inner}>"


class GuidedState:
    """One sequence's progress through its grammar."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"invalid constraint: {self.matcher.get_error()}")

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refuses it (only a token that did
        not come through the mask can be refused)."""
        return bool(self.matcher.consume_token(token))


def mask_logits(logits: torch.Tensor, rows: list[int], states: list[GuidedState]) -> None:
    """Set to -inf, in place, the logits of every token that row `rows[k]` of `logits`
    ([batch, vocab], on the CPU or not) may not produce next under `states[k]`."""
    vocab = logits.shape[-1]
    bitmask = np.empty((len(rows), (vocab + 31) // 32), dtype=np.int32)
    for k, state in enumerate(states):
        state.matcher.unsafe_compute_mask_ptr(bitmask[k].ctypes.data, bitmask[k].nbytes)
    # Bit j of word w allows token 32 w + j (little-endian words, least significant first).
    banned = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
    if logits.device.type == "cpu":
        # numpy's single-threaded fill: torch hands 131k entries to its thread pool, which
        # costs more than the work when the cores are busy with the model.
        for k, row in enumerate(rows):
            np.copyto(logits[row].numpy(), -np.inf, where=banned[k])
        return
    index = torch.tensor(rows, device=logits.device)
    banned_rows = torch.from_numpy(banned).to(logits.device)
    logits[index] = logits[index].masked_fill(banned_rows, float("-inf"))


def tool_calls_guidance(
    tools: list[dict[str, Any]],
    name: str | None = None,
    parallel: bool = True,
    text: bool = False,
    chat_format: str = "mistral",
) -> Guidance:
    """Tool calls: the JSON list of calls, each naming one of `tools` (or the function
    `name`) with arguments valid under its `parameters` schema; one call only unless
    `parallel`. In NeMo's format ("mistral") the list follows `[TOOL_CALLS]`; in the
    generic one ("text", `tokenizer.text_tools`) it sits in a `<tool_call>` block. With
    `text` (tool_choice "auto") the model may answer in text, before calls or instead of
    them, and a call it starts is held to the schemas."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name is None or t["function"]["name"] == name
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    call = (
        "<TOOL_CALLS> calls" if chat_format == "mistral" else '"<tool_call>" calls "</tool_call>"'
    )
    lark = f"start: TEXT | TEXT? {call}\n" if text else f"start: {call}\n"
    lark += f"calls: {json_lark(array)}\n"
    if text:
        lark += "TEXT: /(.|\\n)+/\n"
    return Guidance(grammar=lark)
