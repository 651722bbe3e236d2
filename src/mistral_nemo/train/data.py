"""Pre-training corpora: text files tokenized once into an on-disk cache, read back through
memory maps and packed into fixed-length sequences.

Documents: a `.txt` file is one document (a book, an article, a source file); a `.jsonl`
file holds one document per line, in its `text` field. A folder stands for the `.txt` and
`.jsonl` files under it. Each document is encoded as `tokenizer.encode(text, bos=True,
eos=True)` (BOS only where the tokenizer adds one), and the documents of all files, in the
order given, form one token stream cut into sequences of seq_len + 1 tokens that overlap by
one: inputs are the first seq_len, labels the last seq_len, so every token after the first
is a target exactly once (the tail that fills no sequence is left out).

The cache holds, per source file, the tokens as a flat uint32 file and the documents' start
offsets as uint64, with a JSON record of what they were made from (the file's size, mtime
and SHA-256, the tokenizer's identity). A file whose size and mtime are unchanged is not
read again; one touched but identical (same SHA-256) is not tokenized again. Tokenizing
streams (a `.txt` file in chunks, a `.jsonl` file a batch of lines at a time) and so does
reading (the per-epoch shuffle permutes sequence indices; each batch reads its sequences
from the memory maps), so a corpus larger than memory works.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from mistral_nemo.errors import ConfigError
from mistral_nemo.tokenizer import BaseTokenizer
from mistral_nemo.train.packing import IGNORE, Batch, DataError, EpochStream, epoch_order

log = logging.getLogger("mistral_nemo.train")

CACHE_FORMAT = 1  # bump when the cache's layout or the way documents are encoded changes
SUFFIXES = (".txt", ".jsonl")
TEXT_CHUNK_BYTES = 1 << 22  # a .txt file is read and tokenized about this much at a time
ENCODE_BATCH = 256  # .jsonl documents encoded together (on the tokenizer's thread pool)
BAD_LINES_SHOWN = 10  # bad lines logged one by one; the rest are only counted


class BadLines:
    """What happens to a line that cannot be used: reported with its file and line number and
    skipped (policy "skip", the count logged at the end), or fatal (policy "error")."""

    def __init__(self, policy: str) -> None:
        if policy not in ("skip", "error"):
            raise ConfigError(f"bad_lines must be 'skip' or 'error', got {policy!r}")
        self.policy = policy
        self.per_file: Counter[Path] = Counter()
        self.first: dict[Path, tuple[int, str]] = {}

    @property
    def count(self) -> int:
        return sum(self.per_file.values())

    def report(self, path: Path, line: int, reason: str) -> None:
        if self.policy == "error":
            raise DataError(f"{path}:{line}: {reason}")
        if self.count < BAD_LINES_SHOWN:
            log.warning("%s:%d: %s; line skipped", path, line, reason)
        self.per_file[path] += 1
        self.first.setdefault(path, (line, reason))

    def add_cached(self, path: Path, count: int, first: tuple[int, str]) -> None:
        """The bad lines found when a now cached file was tokenized."""
        if self.policy == "error":
            raise DataError(f"{path}:{first[0]}: {first[1]}")
        log.warning(
            "%s: %d bad lines were skipped when it was tokenized (the first, line %d: %s)",
            path,
            count,
            *first,
        )
        self.per_file[path] += count
        self.first[path] = first

    def log_total(self) -> None:
        if self.count:
            log.warning("skipped %d bad lines in all", self.count)


def read_jsonl(
    path: Path, bad: BadLines, on_bytes: Callable[[int], Any] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a line that is
    not UTF-8 JSON goes to `bad`. `on_bytes` is told the size of each line read."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.report(path, number, f"not UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                bad.report(path, number, f"invalid JSON ({e.msg} at column {e.colno})")


def corpus_files(paths: Sequence[str | Path], suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """The files `paths` name, a folder standing for its files with `suffixes` (sorted)."""
    wanted = " or ".join(suffixes)
    files = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
            if not found:
                raise DataError(f"{path}: no {wanted} files in this folder")
            files += found
        elif not path.is_file():
            raise DataError(f"{path}: no such file")
        elif path.suffix not in suffixes:
            raise DataError(f"{path}: expected a {wanted} file")
        else:
            files.append(path)
    if not files:
        raise DataError("no data files given")
    return files


def tokenizer_identity(tokenizer: BaseTokenizer) -> str:
    """A digest of what decides a tokenizer's ids: its kind, every token's bytes, the control
    tokens' names and the ids of a probe text (BOS/EOS and the pre-tokenizer's splits)."""
    digest = hashlib.sha256(f"{type(tokenizer).__qualname__} {tokenizer.n_words}".encode())
    for i in range(tokenizer.n_words):
        if tokenizer.is_control(i):
            digest.update(b"\1" + tokenizer.control_name(i).encode())
        else:
            digest.update(b"\0" + tokenizer.token_bytes(i))
    probe = "Hello, World!  It's 2024-07-18:\n\tüñí 東京 ½ 12345 don't\r\n\n  end./"
    digest.update(json.dumps(tokenizer.encode(probe, bos=True, eos=True)).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistral-nemo" / "tokens"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenizedFile:
    """One source file's tokens (uint32) and document offsets (uint64: each document's
    start, then the end), memory-mapped from the cache."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray


def tokenized(
    path: Path,
    tokenizer: BaseTokenizer,
    identity: str,
    cache_dir: Path,
    bad: BadLines,
    progress: bool = False,
) -> TokenizedFile:
    """`path` tokenized: from the cache when that is current, else tokenized into it.
    `identity` is `tokenizer_identity(tokenizer)`."""
    source = path.resolve()
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{source}\0{identity}".encode()).hexdigest()[:16]
    base = cache_dir / f"{path.stem}-{key}"
    record = _current_record(base, source)
    if record is None:
        record = _tokenize(path, tokenizer, base, bad, progress)
    elif record["bad_lines"]:
        line, reason = record["first_bad_line"]
        bad.add_cached(path, record["bad_lines"], (line, reason))
    return TokenizedFile(
        path,
        _memmap(_cache_file(base, "tokens"), np.uint32, record["n_tokens"]),
        _memmap(_cache_file(base, "offsets"), np.uint64, record["n_documents"] + 1),
    )


def _cache_file(base: Path, kind: str) -> Path:
    return base.with_name(f"{base.name}.{kind}")  # not with_suffix: the stem may have dots


def _current_record(base: Path, source: Path) -> dict[str, Any] | None:
    """The cache record at `base` if its tokens are still those of `source`, else None."""
    record_path = _cache_file(base, "json")
    try:
        record = json.loads(record_path.read_text())
        complete = _cache_file(base, "tokens").stat().st_size == 4 * record["n_tokens"]
    except (OSError, ValueError, KeyError):
        return None
    stat = source.stat()
    if not complete or record["size"] != stat.st_size:
        return None
    if record["mtime_ns"] != stat.st_mtime_ns:
        # Touched (copied, checked out again): still the same file if its bytes are.
        if record["sha256"] != file_sha256(source):
            return None
        record["mtime_ns"] = stat.st_mtime_ns
        _write_atomic(record_path, lambda f: f.write(json.dumps(record).encode()))
    return record


def _tokenize(
    path: Path, tokenizer: BaseTokenizer, base: Path, bad: BadLines, progress: bool
) -> dict[str, Any]:
    """Tokenize `path` into the cache files at `base`; return their record. The old record
    goes first and the new one is written last, so a record always describes whole files."""
    base.parent.mkdir(parents=True, exist_ok=True)
    record_path = _cache_file(base, "json")
    record_path.unlink(missing_ok=True)
    stat = path.stat()
    record: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "source": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": file_sha256(path),
    }
    offsets = array.array("Q", [0])  # each document's start, then the end
    with tqdm(
        total=stat.st_size,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {path.name}",
        disable=not progress,
    ) as bar:

        def write_tokens(out: IO[bytes]) -> None:
            written = 0
            for piece, ends_document in _token_pieces(path, tokenizer, bad, bar.update):
                out.write(np.asarray(piece, dtype=np.uint32).tobytes())
                written += len(piece)
                if ends_document:
                    offsets.append(written)

        _write_atomic(_cache_file(base, "tokens"), write_tokens)
    _write_atomic(_cache_file(base, "offsets"), lambda out: out.write(offsets.tobytes()))
    first = bad.first.get(path)
    record |= {
        "n_tokens": offsets[-1],
        "n_documents": len(offsets) - 1,
        "bad_lines": bad.per_file[path],
        "first_bad_line": list(first) if first else None,
    }
    _write_atomic(record_path, lambda f: f.write(json.dumps(record).encode()))
    return record


def _token_pieces(
    path: Path, tokenizer: BaseTokenizer, bad: BadLines, on_bytes: Callable[[int], Any]
) -> Iterator[tuple[list[int], bool]]:
    """The ids of a file's documents, in pieces: (ids, whether they end a document)."""
    if path.suffix == ".txt":
        yield from _text_file_pieces(path, tokenizer, on_bytes)
        return
    texts: list[str] = []
    for number, value in read_jsonl(path, bad, on_bytes):
        text = value.get("text") if isinstance(value, dict) else None
        if not isinstance(text, str):
            bad.report(path, number, 'expected an object with a string "text" field')
        elif text:
            texts.append(text)
        if len(texts) == ENCODE_BATCH:
            yield from ((ids, True) for ids in tokenizer.encode_batch(texts, True, True))
            texts = []
    yield from ((ids, True) for ids in tokenizer.encode_batch(texts, True, True))


def _text_file_pieces(
    path: Path, tokenizer: BaseTokenizer, on_bytes: Callable[[int], Any]
) -> Iterator[tuple[list[int], bool]]:
    """A .txt file as one document, read and tokenized a chunk at a time.

    A chunk ends just after a newline that a letter follows: no pre-tokenizer here (Tekken's,
    GPT-2's, Llama 3's) makes a pre-token that runs from a newline into a letter, and BPE
    merges only within a pre-token, so the chunks' ids joined are the whole text's ids."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    started = False
    with path.open("rb") as f:
        while raw := f.read(TEXT_CHUNK_BYTES):
            on_bytes(len(raw))
            # Where a cut may newly be: a newline ending the text so far had no next letter.
            fresh = max(0, len(pending) - 1)
            try:
                pending += decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
            cut = _last_safe_cut(pending, fresh)
            if cut:
                yield tokenizer.encode(pending[:cut], bos=not started), False
                pending, started = pending[cut:], True
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at its end)") from None
    if started or pending:
        yield tokenizer.encode(pending, bos=not started, eos=True), True


def _last_safe_cut(text: str, start: int) -> int:
    """The last index just after a newline at or after `start` that a letter follows, or 0."""
    end = len(text) - 1
    while (newline := text.rfind("\n", start, end)) >= 0:
        if text[newline + 1].isalpha():
            return newline + 1
        end = newline
    return 0


def _memmap(path: Path, dtype: type[np.generic], length: int) -> np.ndarray:
    if length == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write `path` through a temporary file in its folder, renamed into place when whole."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            write(f)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


class TokenStream:
    """Tokenized files as one stream of tokens, each position in a numbered document."""

    def __init__(self, files: Sequence[TokenizedFile]) -> None:
        self.files = [f for f in files if len(f.tokens)]
        self.starts = np.cumsum([0] + [len(f.tokens) for f in self.files])
        self.first_documents = np.cumsum([0] + [len(f.offsets) - 1 for f in self.files])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens start..start+length and the stream-wide document index of each."""
        tokens, documents = [], []
        index = int(np.searchsorted(self.starts, start, side="right")) - 1
        position, end = start, start + length
        while position < end:
            file, local = self.files[index], position - int(self.starts[index])
            take = min(end, int(self.starts[index + 1])) - position
            tokens.append(file.tokens[local : local + take])
            where = np.arange(local, local + take, dtype=np.uint64)
            in_file = np.searchsorted(file.offsets, where, side="right") - 1
            documents.append(self.first_documents[index] + in_file)
            position += take
            index += 1
        return np.concatenate(tokens).astype(np.int64), np.concatenate(documents)


class PretrainingData(EpochStream[int]):
    """Sequences of a token stream (a row is a sequence index), shuffled per epoch."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        seed: int,
        cross_document_attention: bool,
    ) -> None:
        super().__init__(batch_size, seed)
        self.stream, self.seq_len = stream, seq_len
        self.cross_document_attention = cross_document_attention
        self.n_sequences = (len(stream) - 1) // seq_len
        if self.n_sequences < 1:
            raise DataError(
                f"the corpus has {len(stream)} tokens; one sequence of seq_len={seq_len} "
                f"needs {seq_len + 1}"
            )

    def epoch_rows(self, epoch: int) -> Sequence[int]:
        # An array of sequence indices (a list of them would be 36 bytes an index).
        return epoch_order(self.seed, epoch, self.n_sequences)  # type: ignore[return-value]

    def identity(self) -> dict[str, Any]:
        return {"tokens": len(self.stream), "seq_len": self.seq_len}

    def collate(self, rows: list[int]) -> Batch:
        reads = [self.stream.read(int(i) * self.seq_len, self.seq_len + 1) for i in rows]
        sequences = np.stack([tokens for tokens, _ in reads])
        inputs = torch.from_numpy(np.ascontiguousarray(sequences[:, :-1]))
        labels = sequences[:, 1:].copy()
        if self.cross_document_attention:
            return Batch(inputs, torch.from_numpy(labels))
        documents = np.stack([documents for _, documents in reads])
        # Alone in its document, a document's last token cannot know what comes next.
        labels[documents[:, 1:] != documents[:, :-1]] = IGNORE
        relative = (documents[:, :-1] - documents[:, :1]).astype(np.int32)
        return Batch(inputs, torch.from_numpy(labels), torch.from_numpy(relative))


def pretraining_data(
    paths: Sequence[str | Path],
    tokenizer: BaseTokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    cross_document_attention: bool = True,
    cache_dir: Path | None = None,
    bad_lines: str = "skip",
    progress: bool = False,
) -> PretrainingData:
    """Micro-batches of `batch_size` sequences of `seq_len` tokens from text corpora (see the
    module's docstring), the tokenization cached under `cache_dir` (by default
    ~/.cache/mistral-nemo/tokens). Without `cross_document_attention` each batch carries the
    documents for DocumentAttention, and a document's last position trains nothing."""
    check_sizes(seq_len, batch_size)
    bad = BadLines(bad_lines)
    files = corpus_files(paths)
    identity = tokenizer_identity(tokenizer)
    where = cache_dir or default_cache_dir()
    stream = TokenStream([tokenized(p, tokenizer, identity, where, bad, progress) for p in files])
    bad.log_total()
    return PretrainingData(stream, seq_len, batch_size, seed, cross_document_attention)


def check_sizes(seq_len: int, batch_size: int) -> None:
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
