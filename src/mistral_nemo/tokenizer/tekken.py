"""Tekken, NeMo's tokenizer: tiktoken byte-level BPE below a block of control tokens.

`tekken.json` holds the BPE vocabulary (ranks and token bytes) and the pre-tokenizer
pattern. Ids 0..num_special-1 are control tokens ([INST], [TOOL_CALLS], ...); BPE rank r has
id r + num_special. Control tokens are never produced from text: they are only placed by the
instruct encoder, so a user typing "[INST]" gets ordinary text tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken

from mistral_nemo.errors import CheckpointError
from mistral_nemo.tokenizer import instruct
from mistral_nemo.tokenizer.base import BaseTokenizer

# Control tokens of Tekken files that predate a "special_tokens" list (NeMo's
# tekken_240718.json); the rest up to num_special are fillers named <SPECIAL_n>.
# This is mistral-common 1.13.1's list for such files.
LEGACY_CONTROL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)


class Tokenizer(BaseTokenizer):
    def __init__(
        self,
        ranks: dict[bytes, int],
        pattern: str,
        control_tokens: Sequence[str],
        name: str = "tekken",
    ) -> None:
        self.num_special = len(control_tokens)
        self.control_tokens = list(control_tokens)
        self.special_ids = {tok: i for i, tok in enumerate(control_tokens)}
        self._bpe = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
        self.n_words = self.num_special + self._bpe.n_vocab
        self.bos_id = self.special_ids["<s>"]
        self.eos_id = self.special_ids["</s>"]
        self.pad_id = self.special_ids.get("<pad>", -1)
        self.unk_id = self.special_ids.get("<unk>", -1)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            config = data["config"]
            num_special = int(config["default_num_special_tokens"])
            n_bpe = int(config["default_vocab_size"]) - num_special
            vocab = data["vocab"][:n_bpe]
            ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in vocab}
            pattern = config["pattern"]
            listed = [t["token_str"] for t in data.get("special_tokens") or []]
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such tokenizer file") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path}: not a valid tekken.json ({type(e).__name__}: {e})"
            ) from None
        if len(ranks) != n_bpe or sorted(ranks.values()) != list(range(n_bpe)):
            raise CheckpointError(f"{path}: vocabulary ranks are not 0..{n_bpe - 1}")
        named = listed or list(LEGACY_CONTROL_TOKENS)
        controls = named + [f"<SPECIAL_{i}>" for i in range(len(named), num_special)]
        return cls(ranks, pattern, controls)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / "tekken.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no tekken.json (the NeMo tokenizer) found")
        return cls.from_file(path)

    # -- text <-> ids ----------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.num_special + i for i in self._bpe.encode_ordinary(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Ids of an OpenAI-style chat request in the NeMo instruct format (validated first;
        a broken rule raises InvalidRequestError naming the message and the rule)."""
        return instruct.encode_chat(self, messages, tools, continue_final_message)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of an ordinary token (control tokens have none)."""
        self.check_id(token_id)
        if token_id < self.num_special:
            return b""
        return self._bpe.decode_single_token_bytes(token_id - self.num_special)

    def is_control(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special

    def control_name(self, token_id: int) -> str:
        return self.control_tokens[token_id]
