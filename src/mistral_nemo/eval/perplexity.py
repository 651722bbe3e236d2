"""Perplexity of a model on a text file, and bits per byte.

The default protocol is llama.cpp's `llama-perplexity`, so that our figures and llama.cpp's
can be compared: the whole file is tokenized as llama.cpp tokenizes it (BOS in front when
the tokenizer adds one), cut into chunks of `ctx` tokens (the tail dropped), and each chunk
is evaluated from an empty cache with its first token replaced by BOS (again when the
tokenizer adds one: Tekken does; a GGUF vocabulary when its `tokenizer.ggml.add_bos_token`
says so). Only the second half of each chunk is scored: the logits at positions ctx/2 ..
ctx-2 predict the tokens at ctx/2+1 .. ctx-1, so every scored token has at least ctx/2
tokens of context. The uncertainty is llama.cpp's: the standard error of the mean NLL,
times the perplexity.

With `stride`, windows of `ctx` tokens move by `stride` and each scores only the tokens
the previous one did not reach (Hugging Face transformers' sliding-window protocol): every
token but the first is scored once, with at least ctx - stride tokens of context.

Bits per byte divide the total NLL (in bits) by the UTF-8 bytes of the scored tokens, so
models with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mistral_nemo.engine.llm import KV_CACHE_DTYPES
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.eval.report import write_json
from mistral_nemo.model import Transformer
from mistral_nemo.runtime import ModelRunner
from mistral_nemo.runtime.paged import PagedKVCache, PagedStep
from mistral_nemo.tokenizer import BaseTokenizer, load_tokenizer

# The package's evaluation text: Python 3.11 standard library documentation (PSF License),
# >= 100k tokens; benchmarks/make_corpus.py writes it.
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
DEFAULT_CTX = 512
DEFAULT_BATCH = 8  # chunks per forward pass (faster than 1 or 4 on CPU: benchmarks/eval_speed.py)
# Logits computed at once, in elements: 256 MiB of fp32 (512 rows of NeMo's 131072 words).
LOGITS_PER_SLICE = 1 << 26
KV_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Window:
    """Tokens start..end of the stream, evaluated from an empty cache. The logits at
    window positions `scored_from` .. end-start-2 are scored: they predict the tokens at
    stream positions start+scored_from+1 .. end-1."""

    start: int
    end: int
    scored_from: int
    bos_first: bool  # its first token is replaced by BOS

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def targets(self) -> range:
        """Stream positions of the tokens this window scores."""
        return range(self.start + self.scored_from + 1, self.end)


def chunk_windows(n_tokens: int, ctx: int, bos_first: bool) -> list[Window]:
    """llama.cpp's chunks: n_tokens // ctx of them, each scoring its last ctx - 1 - ctx/2
    tokens."""
    if ctx < 3:
        raise InvalidRequestError(
            f"ctx {ctx} is too small: llama.cpp's protocol scores the last ctx - 1 - ctx/2 "
            "tokens of each chunk, none below 3"
        )
    if n_tokens < ctx:
        raise InvalidRequestError(
            f"the text is {n_tokens} tokens, shorter than one chunk of ctx {ctx} tokens: "
            "use a smaller ctx or a longer text"
        )
    return [Window(i * ctx, (i + 1) * ctx, ctx // 2, bos_first) for i in range(n_tokens // ctx)]


def stride_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """Windows of ctx tokens moved by `stride`, each scoring the tokens past the previous
    window's end (the first, all but its first token): every token but the first, once."""
    if ctx < 2:
        raise InvalidRequestError(f"ctx {ctx} is too small: a window needs at least 2 tokens")
    if not 1 <= stride < ctx:
        raise InvalidRequestError(
            f"stride {stride} must be at least 1 and below ctx {ctx} (each window's first "
            "token has no prediction, so windows must overlap)"
        )
    if n_tokens < 2:
        raise InvalidRequestError(f"the text is {n_tokens} tokens: nothing to predict")
    windows, previous_end = [], 0
    for start in range(0, n_tokens, stride):
        end = min(start + ctx, n_tokens)
        windows.append(Window(start, end, max(0, previous_end - start - 1), False))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float | None  # of the perplexity, as llama.cpp computes it (None below 2 tokens)
    bpb: float  # bits per UTF-8 byte of the scored tokens
    nll: float  # total negative log-likelihood, nats
    tokens: int  # scored
    bytes: int  # UTF-8 bytes of the scored tokens
    chunks: int
    ctx: int
    protocol: str  # "llama.cpp" or "stride"
    stride: int | None
    kv_cache_dtype: str
    seconds: float
    tokens_per_s: float
    running: list[float] = field(repr=False)  # the perplexity after each chunk
    model: str = ""
    quantization: str | None = None

    def summary(self) -> str:
        spread = f" +/- {self.stderr:.5f}" if self.stderr is not None else ""
        return (
            f"Final estimate: PPL = {self.ppl:.4f}{spread}, {self.bpb:.4f} bits per byte "
            f"({self.tokens} tokens of {self.chunks} chunks of {self.ctx}, {self.protocol}; "
            f"{self.seconds:.1f} s, {self.tokens_per_s:.0f} tokens/s)"
        )

    def save_json(self, path: str | Path) -> None:
        """Write the result as JSON, atomically."""
        write_json(path, asdict(self))


def adds_bos(tokenizer: BaseTokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text (as llama.cpp's `add_special` does)."""
    return tokenizer.encode("", bos=True) == [tokenizer.bos_id]


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequestError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InvalidRequestError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    if not text:
        raise InvalidRequestError(f"{path}: the file is empty")
    return text


def evaluate_perplexity(
    model: Transformer,
    tokenizer: BaseTokenizer,
    text: str,
    ctx: int = DEFAULT_CTX,
    batch: int = DEFAULT_BATCH,
    stride: int | None = None,
    kv_cache_dtype: str = "auto",
    chunks: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity and bits per byte of `model` on `text`: llama.cpp's protocol, or the
    sliding window of `stride`. `batch` windows go through each forward pass;
    `kv_cache_dtype` "fp8" runs them through a paged cache storing keys and values in E4M3,
    as the engine would. `chunks` keeps the first chunks (or windows) alone, as llama.cpp's
    --chunks. `progress` shows a bar and the running estimates."""
    if batch < 1:
        raise InvalidRequestError(f"batch {batch} must be at least 1")
    if chunks is not None and chunks < 1:
        raise InvalidRequestError(f"chunks {chunks} must be at least 1")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidRequestError(
            f"kv_cache_dtype {kv_cache_dtype!r} is not one of {sorted(KV_CACHE_DTYPES)}"
        )
    if ctx > model.config.max_seq_len:
        raise InvalidRequestError(
            f"ctx {ctx} exceeds the model's context of {model.config.max_seq_len}"
        )
    if not text:
        raise InvalidRequestError("the text is empty")
    tokens = tokenizer.encode(text, bos=True)
    if stride is None:
        windows = chunk_windows(len(tokens), ctx, adds_bos(tokenizer))
    else:
        windows = stride_windows(len(tokens), ctx, stride)
    windows = windows[:chunks]

    scorer = WindowScorer(model, torch.tensor(tokens), tokenizer.bos_id, kv_cache_dtype)
    bar = tqdm(total=len(windows), unit="chunk", disable=not progress, dynamic_ncols=True)
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    start = time.perf_counter()
    with bar:
        for group in batches(windows, batch):
            entries = []
            for window_nll in scorer.score(group):
                nll += window_nll.sum().item()
                nll2 += window_nll.square().sum().item()
                count += window_nll.numel()
                running.append(math.exp(nll / count))
                entries.append(f"[{len(running)}]{running[-1]:.4f},")
            bar.update(len(group))
            if progress:
                bar.write("".join(entries))
    seconds = time.perf_counter() - start

    n_bytes = sum(len(tokenizer.token_bytes(tokens[i])) for w in windows for i in w.targets)
    mean = nll / count
    ppl = math.exp(mean)
    variance = nll2 / count - mean * mean
    return PerplexityResult(
        ppl=ppl,
        stderr=math.sqrt(max(variance, 0.0) / (count - 1)) * ppl if count > 1 else None,
        bpb=nll / math.log(2) / n_bytes,
        nll=nll,
        tokens=count,
        bytes=n_bytes,
        chunks=len(windows),
        ctx=ctx,
        protocol="llama.cpp" if stride is None else "stride",
        stride=stride,
        kv_cache_dtype=kv_cache_dtype,
        seconds=seconds,
        tokens_per_s=count / seconds,
        running=running,
    )


def perplexity(
    model_path: str | Path,
    text_path: str | Path,
    ctx: int = DEFAULT_CTX,
    batch: int = DEFAULT_BATCH,
    stride: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    group_size: int = 128,
    kv_cache_dtype: str = "auto",
    chunks: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """`evaluate_perplexity` of a checkpoint (folder or GGUF) on a UTF-8 text file."""
    text = read_text(text_path)
    tokenizer = load_tokenizer(model_path)
    model = Transformer.from_pretrained(
        model_path, dtype=dtype, device=device, quantize=quantize, group_size=group_size
    )
    result = evaluate_perplexity(
        model, tokenizer, text, ctx, batch, stride, kv_cache_dtype, chunks, progress
    )
    return replace(result, model=str(model_path), quantization=quantize)


def batches(windows: Sequence[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, up to `size` at a time (one forward each)."""
    group: list[Window] = []
    for window in windows:
        if group and (len(group) == size or window.length != group[0].length):
            yield group
            group = []
        group.append(window)
    if group:
        yield group


class WindowScorer:
    """The NLL (nats, float64) of each scored token of windows of a token stream."""

    def __init__(
        self, model: Transformer, tokens: torch.Tensor, bos_id: int, kv_cache_dtype: str
    ) -> None:
        self.model, self.tokens, self.bos_id = model, tokens, bos_id
        self.runner = ModelRunner(model)
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache_dtype]

    @torch.inference_mode()
    def score(self, windows: Sequence[Window]) -> list[torch.Tensor]:
        """One forward over windows of equal length; the LM head only on the scored rows,
        in slices (a full [batch, ctx, vocab] of logits would be 256 MiB per 512 tokens of
        NeMo)."""
        device = self.model.device
        inputs = torch.stack([self.tokens[w.start : w.end] for w in windows])
        for row, window in zip(inputs, windows, strict=True):
            if window.bos_first:
                row[0] = self.bos_id
        inputs = inputs.to(device)
        hidden = self.runner.hidden(inputs, 0, self._cache(len(windows), windows[0].length))
        length = windows[0].length
        rows = torch.cat([hidden[i, w.scored_from : length - 1] for i, w in enumerate(windows)])
        targets = torch.cat([self.tokens[w.targets.start : w.end] for w in windows]).to(device)
        per_slice = max(1, LOGITS_PER_SLICE // self.model.config.vocab_size)
        nll = torch.cat(
            [
                token_nll(self.model.output(rows[i : i + per_slice]), targets[i : i + per_slice])
                for i in range(0, len(rows), per_slice)
            ]
        ).cpu()
        return list(nll.split([len(w.targets) for w in windows]))

    def _cache(self, n: int, length: int) -> PagedStep | None:
        """A fresh paged cache for `n` windows when keys and values are stored in another
        dtype than the model's (FP8); None otherwise (attention over the pass's own keys)."""
        if self.kv_dtype is None:
            return None
        per_window = -(-length // KV_BLOCK_SIZE)
        cache = PagedKVCache(
            self.model.config,
            n * per_window,
            KV_BLOCK_SIZE,
            length,
            self.model.dtype,
            self.model.device,
            kv_dtype=self.kv_dtype,
        )
        tables = [range(i * per_window, (i + 1) * per_window) for i in range(n)]
        return cache.step(tables, [0] * n, length)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, as float64 so that sums over 100k tokens keep
    their digits."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return (lse - logits.gather(1, targets[:, None]).squeeze(1)).double()
