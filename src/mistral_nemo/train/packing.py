"""Micro-batches of packed sequences, the stream that deals them out epoch after epoch, and the
attention that keeps packed documents apart.

Packing puts several documents (or conversations) into one fixed-length row, so no compute
goes to padding. By default a token may attend to the documents packed before it in its
row (as Megatron-LM pre-trains). Without cross-document attention each row carries the
document index of every position, and `DocumentAttention` gives the model a block-causal
mask and positions that restart at 0 in each document: every document then sees exactly
what it would see alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from mistral_nemo.config import ModelConfig
from mistral_nemo.errors import MistralNemoError
from mistral_nemo.model import rope_frequencies

IGNORE = -100  # the label of a position that is not trained (cross_entropy's ignore_index)


class DataError(MistralNemoError, ValueError):
    """Training data that cannot be used as given: a bad file or line, too few tokens, or a
    saved data position that belongs to other data."""


class DocumentAttention:
    """The attention of packed rows without cross-document attention: a query sees the
    earlier keys of its own document only, and rotary positions restart at 0 in each
    document. It stores no keys or values, so it serves one pass over whole rows from
    position 0 (training), not generation.

    `documents` [batch, seq] numbers the documents of each row; a document is a run of
    equal numbers.
    """

    def __init__(self, config: ModelConfig, documents: torch.Tensor) -> None:
        batch, seq = documents.shape
        index = torch.arange(seq, device=documents.device).expand(batch, seq)
        starts = torch.ones_like(documents, dtype=torch.bool)
        starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
        # Position within the document: distance to the latest document start.
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        self.positions = index - first
        table = rope_frequencies(config, 0, int(self.positions.max()) + 1, documents.device)
        self.freqs = table[self.positions]  # [batch, seq, head_dim / 2]
        same_document = documents[:, :, None] == documents[:, None, :]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
        self.mask = (same_document & causal)[:, None]  # [batch, 1, seq, seq]

    def rope(self, start: int, length: int) -> torch.Tensor:
        self._check_whole_rows(start, length)
        return self.freqs

    def attend(
        self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self._check_whole_rows(start, q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)

    def _check_whole_rows(self, start: int, length: int) -> None:
        if start != 0 or length != self.positions.shape[1]:
            raise ValueError(
                f"DocumentAttention covers whole rows of {self.positions.shape[1]} tokens from "
                f"position 0, not {length} tokens from position {start}"
            )


@dataclass
class Batch:
    """One micro-batch: inputs, next-token targets (IGNORE where nothing is trained) and,
    when cross-document attention is off, the document index of each position."""

    tokens: torch.Tensor  # [batch, seq] int64
    labels: torch.Tensor  # [batch, seq] int64
    documents: torch.Tensor | None = None  # [batch, seq] int32

    def to(self, device: torch.device | str) -> Batch:
        documents = None if self.documents is None else self.documents.to(device)
        return Batch(self.tokens.to(device), self.labels.to(device), documents)

    def attention(self, config: ModelConfig) -> DocumentAttention | None:
        """The attention for `model(tokens, 0, ...)`: None (plain causal) or the
        block-causal DocumentAttention on the documents' device."""
        if self.documents is None:
            return None
        return DocumentAttention(config, self.documents)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


class TrainData(Protocol):
    """A stream of micro-batches with a resumable position."""

    def batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, from the current position on."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded (plain Python values)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: `batches()` then yields what the uninterrupted
        stream would have yielded next."""
        ...


Row = TypeVar("Row")


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of n items in an epoch; the same for the same seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochStream(ABC, Generic[Row]):
    """TrainData over rows that each epoch lists in its own seeded order. Batches take
    consecutive rows, running on into the next epoch, so no row is dropped and every batch
    has the same shape; the position is (epoch, next row)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.row = 0, 0

    @abstractmethod
    def epoch_rows(self, epoch: int) -> Sequence[Row]:
        """The rows of `epoch` in order (at least one)."""

    @abstractmethod
    def collate(self, rows: list[Row]) -> Batch: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a saved position must agree on to belong to this data."""

    def batches(self) -> Iterator[Batch]:
        rows = self.epoch_rows(self.epoch)
        while True:
            taken: list[Row] = []
            while len(taken) < self.batch_size:
                if self.row == len(rows):
                    self.epoch, self.row = self.epoch + 1, 0
                    rows = self.epoch_rows(self.epoch)
                taken.append(rows[self.row])
                self.row += 1
            yield self.collate(taken)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"seed": self.seed, **self.identity()}
        differ = [
            f"{k} {state.get(k)!r} != {v!r}" for k, v in expected.items() if state.get(k) != v
        ]
        if differ:
            raise DataError(
                "the saved data position belongs to other data or settings "
                f"(saved vs now: {'; '.join(differ)})"
            )
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
