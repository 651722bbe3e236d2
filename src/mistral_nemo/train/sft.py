"""Supervised fine-tuning data: OpenAI-style conversations, tools and tool calls included,
encoded in the model's own chat format with the loss on the assistant's tokens only.

A JSONL line is `{"messages": [...], "tools": [...]}` (tools optional) with system, user,
assistant (content, or `tool_calls` of `{"id", "function": {"name", "arguments"}}`) and
tool (`tool_call_id`, content) messages, ending with the assistant's turn. Every assistant
turn is trained, its closing EOS included (a model that never sees it never learns to stop);
system, user, tool-result and tool-definition tokens are not.

Tekken models use the NeMo instruct format, where the system prompt and the tool list go
inside the last user turn, so encoding a conversation's prefixes does not find the turns:
the assistant's spans come from the control tokens of the whole encoding instead (after
[/INST] or [/TOOL_RESULTS], through the next </s>). Other models use their Jinja chat
template, whose renderings of ever longer prefixes of the conversation must extend each
other; the text each assistant turn adds is its span.

Conversations are packed into rows of seq_len tokens (one longer than seq_len + 1 tokens
is truncated), shuffled per epoch before packing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.tokenizer import BaseTokenizer, SpecialTokenPolicy, Tokenizer
from mistral_nemo.tokenizer.bpe import TemplateTokenizer
from mistral_nemo.train.data import BadLines, check_sizes, corpus_files, read_jsonl
from mistral_nemo.train.packing import IGNORE, Batch, DataError, EpochStream, epoch_order

log = logging.getLogger("mistral_nemo.train")


class ChatTemplateError(DataError):
    """A chat template that cannot be trained on: none, or one that does not close the
    assistant's turns with EOS. Fatal whatever the bad-lines policy: the template, not a
    line, is at fault."""


@dataclass
class EncodedConversation:
    ids: list[int]
    trained: list[bool]  # per id: whether it is the assistant's (a target of the loss)


def parse_conversation(record: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools of one JSONL record, checked for what training needs (the
    chat format's own rules are checked when encoding); DataError names what is wrong."""
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError('missing "messages": expected {"messages": [...], "tools": [...]}')
    messages, tools = record["messages"], record.get("tools")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError('"messages" must be a list of message objects')
    if tools is not None and not isinstance(tools, list):
        raise DataError('"tools" must be a list of tool objects')
    roles = [m.get("role") for m in messages]
    if "assistant" not in roles:
        raise DataError("no assistant turn to train on")
    if roles[-1] != "assistant":
        raise DataError(
            f"the conversation ends with a {roles[-1]} message; it must end with the "
            "assistant's turn (nothing after it would be trained)"
        )
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise DataError(f"messages[{i}].tool_calls: must be a list of tool calls")
        for j, call in enumerate(calls):
            _check_arguments(call, f"messages[{i}].tool_calls[{j}]")
    return messages, tools


def _check_arguments(call: Any, where: str) -> None:
    """A tool call's arguments must be a JSON object (or its text): they are what a model
    trained on them will write."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise DataError(f'{where}: expected {{"id", "function": {{"name", "arguments"}}}}')
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}.function.arguments: not JSON ({e.msg})") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where}.function.arguments: must be a JSON object")


def encode_conversation(tokenizer: BaseTokenizer, record: Any) -> EncodedConversation:
    """One conversation (a parsed JSONL record) in the model's chat format, each id marked
    trained or not. DataError says why a conversation cannot be used."""
    messages, tools = parse_conversation(record)
    try:
        if isinstance(tokenizer, Tokenizer):
            ids = _instruct_ids(tokenizer, messages, tools)
            return EncodedConversation(ids, _instruct_trained(tokenizer, ids))
        if isinstance(tokenizer, TemplateTokenizer):
            return _encode_with_template(tokenizer, messages, tools)
    except InvalidRequestError as e:
        raise DataError(str(e)) from None
    raise DataError(f"no chat format is known for a {type(tokenizer).__name__}")


def _instruct_ids(
    tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[int]:
    """The NeMo instruct encoding of a conversation that ends with the assistant's closed
    turn, as mistral-common encodes it for fine-tuning.

    `encode_chat` encodes requests for generation, which end with a user or tool message or
    an assistant message to continue, and whose tool calls all have results. So a final
    text turn is encoded as one to continue, then closed with </s>; final tool calls get
    placeholder results, cut off again after the calls' </s> (results come after the last
    user turn, so they change nothing before them)."""
    final = messages[-1]
    if not final.get("tool_calls"):
        return tok.encode_chat(messages, tools, continue_final_message=True) + [tok.eos_id]
    results = [
        {"role": "tool", "tool_call_id": call.get("id"), "content": ""}
        for call in final["tool_calls"]
    ]
    ids = tok.encode_chat([*messages, *results], tools)
    calls = len(ids) - 1 - ids[::-1].index(tok.control_id("[TOOL_CALLS]"))
    return ids[: ids.index(tok.eos_id, calls) + 1]


def _instruct_trained(tok: Tokenizer, ids: list[int]) -> list[bool]:
    """The assistant's tokens of an instruct encoding: from after [/INST] or
    [/TOOL_RESULTS] through the next </s>, [TOOL_CALLS] and the calls included. Any other
    control token there ([TOOL_RESULTS] of a further result, [INST], [AVAILABLE_TOOLS])
    means the assistant had no turn."""
    opening = {tok.control_id("[/INST]"), tok.control_id("[/TOOL_RESULTS]")}
    allowed = {tok.control_id("[TOOL_CALLS]"), tok.eos_id}
    trained, inside = [], False
    for token in ids:
        if token in opening:
            trained.append(False)
            inside = True
            continue
        if inside and tok.is_control(token) and token not in allowed:
            inside = False
        trained.append(inside)
        if token == tok.eos_id:
            inside = False
    return trained


def _encode_with_template(
    tok: TemplateTokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> EncodedConversation:
    """Assistant turn i is the text that messages[:i + 1] renders beyond messages[:i] with
    the generation prompt, up to its EOS (a newline the template writes after the EOS is
    formatting between turns, not the assistant's). Ids are marked by the byte where they
    start in the rendered text."""
    if tok.chat_template is None:
        raise ChatTemplateError("this model has no chat template to encode conversations with")
    full = tok.render_chat(messages, tools, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tok.render_chat(messages[:i], tools, True)
        through = tok.render_chat(messages[: i + 1], tools, False)
        if not (through.startswith(before) and full.startswith(through)):
            # Per conversation, not fatal: templates such as SmolLM2's write a default system
            # prompt before a first message that is not a system one, but not before none.
            raise DataError(
                f"the chat template does not render messages[:{i}] with the generation prompt "
                f"as the start of messages[:{i + 1}], and that as the start of the whole "
                "conversation, so the assistant's tokens cannot be located"
            )
        spans.append((len(before.encode()), len(through.encode())))
    ids = tok.encode_with_controls(full)
    sizes = [
        len(tok.control_name(i).encode()) if tok.is_control(i) else len(tok.token_bytes(i))
        for i in ids
    ]
    starts = np.cumsum([0, *sizes[:-1]])
    if sum(sizes) != len(full.encode()):
        raise DataError("the tokenizer does not reproduce the rendered conversation byte for byte")
    ids_array = np.asarray(ids)
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        span = (starts >= start) & (starts < end)
        eos = np.flatnonzero(span & (ids_array == tok.eos_id))
        if not len(eos):
            raise ChatTemplateError(
                f"the chat template does not end the assistant's turn with the EOS token "
                f"{tok.id_to_piece(tok.eos_id)!r}; a model trained on it would never learn to stop"
            )
        trained |= span & (np.arange(len(ids)) <= eos[-1])
    return EncodedConversation(ids, trained.tolist())


def first_conversation(path: Path) -> Any:
    """The first record of a JSONL conversation file (to show its masking); a line that is
    not JSON raises DataError naming it."""
    for _, record in read_jsonl(path, BadLines("error")):
        return record
    raise DataError(f"{path}: no conversations in this file")


def show_masking(tokenizer: BaseTokenizer, conversation: Any, color: bool = False) -> str:
    """One conversation encoded, as text (control tokens by name) with the trained tokens
    marked: in [[...]], or in green with `color` (for a terminal)."""
    encoded = encode_conversation(tokenizer, conversation)
    start, end = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    parts = []
    for trained, run in groupby(
        zip(encoded.ids, encoded.trained, strict=True), key=lambda pair: pair[1]
    ):
        text = tokenizer.decode([token for token, _ in run], SpecialTokenPolicy.KEEP)
        parts.append(f"{start}{text}{end}" if trained else text)
    summary = (
        f"{len(encoded.ids)} tokens, {sum(encoded.trained)} trained (marked {start}like this{end})"
    )
    return "".join(parts) + "\n\n" + summary


@dataclass
class Example:
    """A conversation as model inputs and next-token labels (IGNORE where not trained)."""

    inputs: np.ndarray  # int32
    labels: np.ndarray  # int32


def example_of(encoded: EncodedConversation) -> Example:
    ids = np.asarray(encoded.ids, dtype=np.int32)
    trained = np.asarray(encoded.trained, dtype=bool)
    return Example(ids[:-1], np.where(trained[1:], ids[1:], IGNORE).astype(np.int32))


class SFTData(EpochStream[list[int]]):
    """Conversations packed into rows of seq_len tokens (a row is the list of its
    conversations), in an order shuffled per epoch; the rest of a row is padding that
    trains nothing."""

    def __init__(
        self,
        examples: list[Example],
        pad_id: int,
        seq_len: int,
        batch_size: int,
        seed: int,
        cross_document_attention: bool,
    ) -> None:
        super().__init__(batch_size, seed)
        self.examples, self.pad_id, self.seq_len = examples, pad_id, seq_len
        self.cross_document_attention = cross_document_attention
        self.n_tokens = sum(len(e.inputs) for e in examples)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        rows: list[list[int]] = [[]]
        used = 0
        for i in epoch_order(self.seed, epoch, len(self.examples)):
            size = len(self.examples[i].inputs)
            if used + size > self.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(int(i))
            used += size
        return rows

    def identity(self) -> dict[str, Any]:
        return {
            "conversations": len(self.examples),
            "tokens": self.n_tokens,
            "seq_len": self.seq_len,
        }

    def collate(self, rows: list[list[int]]) -> Batch:
        shape = (len(rows), self.seq_len)
        tokens = np.full(shape, self.pad_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        documents = np.zeros(shape, dtype=np.int32)
        for r, row in enumerate(rows):
            at = 0
            for document, i in enumerate(row):
                example = self.examples[i]
                end = at + len(example.inputs)
                tokens[r, at:end], labels[r, at:end] = example.inputs, example.labels
                documents[r, at:end] = document
                at = end
            documents[r, at:] = len(row)  # the padding, a document of its own
        if self.cross_document_attention:
            return Batch(torch.from_numpy(tokens), torch.from_numpy(labels))
        return Batch(
            torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(documents)
        )


def sft_data(
    paths: Sequence[str | Path],
    tokenizer: BaseTokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    cross_document_attention: bool = False,
    bad_lines: str = "skip",
    progress: bool = False,
) -> SFTData:
    """Micro-batches of `batch_size` rows of `seq_len` tokens packed from JSONL conversation
    files (see the module's docstring). A bad line is reported with its file and line number
    and skipped, or raises DataError with `bad_lines="error"`."""
    check_sizes(seq_len, batch_size)
    bad = BadLines(bad_lines)
    examples: list[Example] = []
    truncated = emptied = 0
    for path in corpus_files(paths, suffixes=(".jsonl",)):
        with tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"encoding {path.name}",
            disable=not progress,
        ) as bar:
            for number, record in read_jsonl(path, bad, bar.update):
                try:
                    encoded = encode_conversation(tokenizer, record)
                except ChatTemplateError as e:
                    raise ChatTemplateError(f"{path}:{number}: {e}") from None
                except DataError as e:
                    bad.report(path, number, str(e))
                    continue
                example = example_of(encoded)
                if len(example.inputs) > seq_len:
                    truncated += 1
                    example = Example(example.inputs[:seq_len], example.labels[:seq_len])
                    if (example.labels == IGNORE).all():
                        emptied += 1
                        continue
                examples.append(example)
    bad.log_total()
    if truncated:
        log.warning(
            "%d conversations longer than seq_len + 1 = %d tokens were truncated; %d of them "
            "had nothing left to train and were left out",
            truncated,
            seq_len + 1,
            emptied,
        )
    if not examples:
        raise DataError(f"no usable conversations in {', '.join(map(str, paths))}")
    return SFTData(examples, tokenizer.eos_id, seq_len, batch_size, seed, cross_document_attention)
