"""What every byte-level BPE tokenizer here shares: ids to text (whole or streamed), control
tokens by name, batch encoding. Subclasses say how text becomes ids and what a token is."""

from __future__ import annotations

import codecs
import enum
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any

from mistral_nemo.errors import InvalidRequestError


class SpecialTokenPolicy(enum.Enum):
    """What `decode` does with control tokens."""

    IGNORE = "ignore"  # leave them out of the text
    KEEP = "keep"  # write their names, e.g. "[INST]"
    RAISE = "raise"  # raise InvalidRequestError


class BaseTokenizer(ABC):
    """A vocabulary of `n_words` ids: control tokens (named in `special_ids`, never produced
    from user text) and ordinary tokens, each a byte string."""

    n_words: int
    bos_id: int
    eos_id: int
    special_ids: dict[str, int]

    @abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` as ordinary tokens, with BOS/EOS around them when asked."""

    @abstractmethod
    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Ids of an OpenAI-style conversation in the model's chat format."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of an ordinary token (control tokens have none)."""

    @abstractmethod
    def is_control(self, token_id: int) -> bool: ...

    @abstractmethod
    def control_name(self, token_id: int) -> str: ...

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """Encode many texts on a thread pool (the BPE libraries release the GIL).

        Each thread takes one contiguous share of the texts: one task per text costs more
        than it gains for short texts.
        """
        texts = list(texts)
        threads = min(num_threads or os.cpu_count() or 1, max(1, len(texts) // 8))
        if threads <= 1:
            return [self.encode(t, bos, eos) for t in texts]
        size = -(-len(texts) // threads)
        shares = [texts[i : i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda share: [self.encode(t, bos, eos) for t in share], shares)
            return [ids for part in parts for ids in part]

    def decode(
        self, ids: Iterable[int], special: SpecialTokenPolicy = SpecialTokenPolicy.IGNORE
    ) -> str:
        """Text of `ids`. Bytes that do not form valid UTF-8 (a multi-byte character cut
        between tokens) become U+FFFD, per run of ordinary tokens, as mistral-common does."""
        parts: list[str] = []
        for is_control, run in groupby(ids, self.is_control):
            if is_control:
                parts.extend(self.control_text(i, special) for i in run)
            else:
                raw = b"".join(self.token_bytes(i) for i in run)
                parts.append(raw.decode("utf-8", errors="replace"))
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str:
        return self.decode([token_id], SpecialTokenPolicy.KEEP)

    def control_id(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a control token of this tokenizer") from None

    def stream_decoder(
        self, special: SpecialTokenPolicy = SpecialTokenPolicy.IGNORE
    ) -> StreamDecoder:
        return StreamDecoder(self, special)

    def check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.n_words:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary (0..{self.n_words - 1})"
            )

    def control_text(self, token_id: int, special: SpecialTokenPolicy) -> str:
        """How a control token reads under `special`."""
        self.check_id(token_id)
        if special is SpecialTokenPolicy.RAISE:
            raise InvalidRequestError(
                f"cannot decode control token {token_id} "
                f"({self.control_name(token_id)}) under policy RAISE"
            )
        return self.control_name(token_id) if special is SpecialTokenPolicy.KEEP else ""


class StreamDecoder:
    """Turns ids into text as they arrive, holding back a UTF-8 character cut between
    tokens until its last byte comes."""

    def __init__(self, tokenizer: BaseTokenizer, special: SpecialTokenPolicy) -> None:
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._tok.is_control(token_id):
            return self._utf8.decode(b"", final=True) + self._tok.control_text(
                token_id, self._special
            )
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
