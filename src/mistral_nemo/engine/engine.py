"""The continuous-batching engine: requests in, one scheduling step at a time, outputs out.

Each step feeds the model every running sequence's pending tokens: one token for a
sequence that is decoding (all of them in one batched forward pass), a chunk of its prompt
for one that is still prefilling (within a per-step token budget, so long prompts are
interleaved with decoding instead of stalling it; chunks of similar length share one padded
pass). Finished sequences leave and waiting
ones join between steps. When the block pool runs dry, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import llguidance
import torch

from mistral_nemo.engine.blocks import BlockPool, block_hash
from mistral_nemo.engine.outputs import CompletionOutput, RequestOutput
from mistral_nemo.errors import InvalidRequestError
from mistral_nemo.model import Transformer
from mistral_nemo.runtime import ModelRunner
from mistral_nemo.runtime.paged import PagedKVCache
from mistral_nemo.sampling import SamplingParams, TokenLogprob, sample_batch, token_logprobs
from mistral_nemo.structured import GuidedState, llg_tokenizer, mask_logits
from mistral_nemo.tokenizer.base import BaseTokenizer, StreamDecoder

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # one sequence is equal only to itself (the scheduler's `in` tests)
class Sequence:
    """One completion of a request: its tokens, blocks and text."""

    request: Request
    index: int
    order: int  # arrival order; preemption picks the newest
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the full blocks, in order
    computed: int = 0  # tokens whose keys and values are in the cache
    text: str = ""
    sent: int = 0  # characters of text already reported
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    guided: GuidedState | None = None  # where a structured output has got to

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt + self.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.request.prompt[-1]

    @property
    def pending(self) -> int:
        return len(self.request.prompt) + len(self.output) - self.computed


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    # With params.prompt_logprobs: the logprob of each prompt token (None before
    # params.prompt_logprobs_from), filled in by its first sequence's prefill.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: BaseTokenizer | None,
        num_blocks: int,
        block_size: int = 16,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.max_model_len = min(
            max_model_len or model.config.max_seq_len, model.config.max_seq_len
        )
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.chunk = max_num_batched_tokens
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.cache = PagedKVCache(
            model.config,
            num_blocks,
            block_size,
            self.max_model_len,
            model.dtype,
            model.device,
            kv_dtype,
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self.preemptions = 0

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.check_prompt(prompt, self.model.config.vocab_size, self.max_model_len)
        total = len(prompt) + params.max_tokens
        if -(-total // self.block_size) > self.pool.num_blocks:
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} does not "
                f"fit the KV cache ({self.pool.num_blocks * self.block_size} tokens)"
            )
        guidance = self._guidance(params)
        request = Request(request_id, list(prompt), params)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(prompt)
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.model.device).manual_seed(params.seed + i)
            decoder = self.tokenizer.stream_decoder() if self.tokenizer else None
            seq = Sequence(request, i, next(self._ids), generator, decoder)
            if guidance is not None:
                seq.guided = GuidedState(*guidance)
            request.sequences.append(seq)
            self.waiting.append(seq)
        self.requests[request_id] = request
        return request_id

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _guidance(self, params: SamplingParams) -> tuple[llguidance.LLTokenizer, str] | None:
        """The vocabulary and llguidance grammar of a structured-output request (checked)."""
        if params.guided is None:
            return None
        if self.tokenizer is None:
            raise InvalidRequestError("structured outputs need the model's tokenizer")
        vocabulary = llg_tokenizer(self.tokenizer, self.vocab_size)
        grammar = params.guided.llguidance_grammar()
        if error := llguidance.LLMatcher.validate_grammar(grammar, vocabulary):
            raise InvalidRequestError(f"invalid constraint: {error}")
        return vocabulary, grammar

    def abort(self, request_id: str) -> None:
        """Drop a request now, freeing its blocks (a client went away)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.sequences:
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._free(seq)
            seq.finish_reason = seq.finish_reason or "abort"

    def num_waiting_requests(self) -> int:
        """Requests none of whose sequences has started (a request of n > 1 waits as one)."""
        return len({s.request.request_id for s in self.waiting})

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass for the scheduled tokens; outputs of requests that advanced."""
        decode, chunks = self._schedule()
        with self.runner.decoding(len(decode), prefill=bool(chunks)):
            return self._step(decode, chunks)

    def _step(
        self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]
    ) -> list[RequestOutput]:
        device = self.model.device
        decode_input = None
        if decode:
            step = self.cache.step([s.blocks for s in decode], [s.computed for s in decode], 1)
            decode_input = (torch.tensor([[s.last_token] for s in decode], device=device), step)
        groups = prefill_groups(chunks)
        prefills = []
        for group in groups:
            step = self.cache.step(
                [s.blocks for s, _ in group], [s.computed for s, _ in group], [n for _, n in group]
            )
            width = step.length
            tokens = [s.tokens[s.computed : s.computed + n] + [0] * (width - n) for s, n in group]
            counts = [self._rows_wanted(s, n) for s, n in group]
            prefills.append((torch.tensor(tokens, device=device), step, counts))
        logits = self.runner.step(decode_input, prefills)
        for s in decode:
            s.computed += 1
            self._register_full_blocks(s)
        # The rows of `logits`: the decoding sequences', then each chunk's `wanted` last, in
        # the order of the prefill batches.
        sampled, rows = list(decode), list(range(len(decode)))
        advanced: dict[str, Request] = {}
        at = len(decode)
        in_order = [
            (s, n, w)
            for g, p in zip(groups, prefills, strict=True)
            for (s, n), w in zip(g, p[2], strict=True)
        ]
        for s, n, wanted in in_order:
            if wanted and s.request.prompt_logprobs is not None and s.index == 0:
                assert logits is not None
                self._score_prompt(s, s.computed + n - wanted, logits[at : at + wanted])
                advanced[s.request.request_id] = s.request
            s.computed += n
            self._register_full_blocks(s)
            if s.pending == 0 and len(s.output) < s.request.params.max_tokens:
                sampled.append(s)
                rows.append(at + wanted - 1)
            elif s.pending == 0:  # a prompt scored, nothing to generate
                self._finish(s, "length")
                advanced[s.request.request_id] = s.request
            at += wanted
        if sampled:
            assert logits is not None
            if len(rows) < at:  # (copying a step's logits costs ~1 ms: only when needed)
                logits = logits[rows]
            for request in self._sample(sampled, logits):
                advanced[request.request_id] = request
        return [self._output(r) for r in advanced.values()]

    def _rows_wanted(self, seq: Sequence, n: int) -> int:
        """How many of a prompt chunk's last positions need logits: the last one where the
        chunk ends the tokens (to sample the next), and each from prompt_logprobs_from - 1
        on where the prompt is scored (position p predicts prompt token p + 1)."""
        params, end = seq.request.params, seq.computed + n
        wanted = int(seq.pending == n and len(seq.output) < params.max_tokens)
        if seq.request.prompt_logprobs is not None and seq.index == 0:
            first = max(seq.computed, params.prompt_logprobs_from - 1)
            if first < min(end, len(seq.request.prompt) - 1):
                wanted = end - first
        return wanted

    def _score_prompt(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that the logits of positions first.. predict."""
        request = seq.request
        assert request.prompt_logprobs is not None
        start = max(first, request.params.prompt_logprobs_from - 1)
        stop = min(first + len(logits), len(request.prompt) - 1)
        if start >= stop:
            return
        targets = torch.tensor(request.prompt[start + 1 : stop + 1])
        found = token_logprobs(
            logits[start - first : stop - first], targets, request.params.prompt_logprobs or 0
        )
        request.prompt_logprobs[start + 1 : stop + 1] = found

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self._free(seq)

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        decode = []
        for seq in sorted((s for s in self.running if s.pending == 1), key=lambda s: s.order):
            if seq in self.running and self._reserve(seq, seq.computed + 1):
                decode.append(seq)
        # Prompts are chunked shortest first, so a short request that arrives during a long
        # prefill is answered after one more chunk of it, not after the whole prompt.
        budget = max(self.chunk - len(decode), 1)
        arrivals = list(itertools.islice(self.waiting, self.max_num_seqs - len(self.running)))
        for seq in arrivals:
            self._match_prefix(seq)
        prefilling = [s for s in self.running if s.pending > 1]
        chunks = []
        admitting = True
        for seq in sorted([*prefilling, *arrivals], key=lambda s: s.pending):
            n = min(seq.pending, budget)
            if n <= 0:
                break
            if seq in self.running:
                if self._reserve(seq, seq.computed + n):
                    chunks.append((seq, n))
                    budget -= n
                continue
            blocks = -(-(seq.computed + n) // self.block_size) - len(seq.blocks)
            if not admitting or blocks > self.pool.num_free:
                admitting = False  # no room: the blocks stay with the running sequences
                continue
            self.waiting.remove(seq)
            self.running.append(seq)
            self._reserve(seq, seq.computed + n)
            chunks.append((seq, n))
            budget -= n
        for seq in arrivals:
            if seq in self.waiting:
                self._free(seq)  # not now: keep the blocks for the running sequences
        return [s for s in decode if s in self.running], [c for c in chunks if c[0] in self.running]

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `tokens` tokens of `seq`, preempting newer sequences if need be."""
        needed = -(-tokens // self.block_size) - len(seq.blocks)
        while needed > self.pool.num_free:
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim)
            if victim is seq:
                return False
        for _ in range(needed):
            seq.blocks.append(self.pool.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes, seq.computed = [], [], 0

    def _match_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks of this sequence's longest cached prefix (always leaving
        its last token to compute, since its logits are needed, and every position whose
        logits score the prompt)."""
        tokens, bs = seq.tokens, self.block_size
        limit = len(tokens) - 1
        if seq.request.prompt_logprobs is not None and seq.index == 0:
            limit = min(limit, seq.request.params.prompt_logprobs_from - 1)
        while (len(seq.blocks) + 1) * bs <= limit:
            i = len(seq.blocks)
            h = block_hash(seq.hashes[-1] if seq.hashes else None, tokens[i * bs : (i + 1) * bs])
            block = self.pool.lookup(h)
            if block is None:
                break
            seq.blocks.append(block)
            seq.hashes.append(h)
            seq.computed = len(seq.blocks) * bs

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        if (len(seq.hashes) + 1) * bs > seq.computed:
            return
        tokens = seq.tokens
        while (len(seq.hashes) + 1) * bs <= seq.computed:
            i = len(seq.hashes)
            h = block_hash(seq.hashes[-1] if seq.hashes else None, tokens[i * bs : (i + 1) * bs])
            self.pool.register(seq.blocks[i], h)
            seq.hashes.append(h)

    # -- sampling and outputs ------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Request]:
        guided = [(row, s.guided) for row, s in enumerate(seqs) if s.guided is not None]
        if guided:
            mask_logits(logits, [row for row, _ in guided], [state for _, state in guided])
        tokens, logprobs = sample_batch(
            logits,
            [s.request.params for s in seqs],
            [s.request.prompt for s in seqs],
            [s.output for s in seqs],
            [s.generator for s in seqs],
        )
        touched: dict[str, Request] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            if seq.guided is not None and not seq.guided.advance(token):
                # Only a token that bypassed the mask gets here: the rest goes unconstrained.
                logger.warning("%s: %s", seq.request.request_id, seq.guided.matcher.get_error())
                seq.guided = None
            self._append(seq, token, lp)
            touched[seq.request.request_id] = seq.request
        return list(touched.values())

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        params = seq.request.params
        seq.output.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.decoder is not None:
            seq.text += seq.decoder.push(token)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(
                self.model.config.eos_id if self.tokenizer is None else self.tokenizer.eos_id
            )
        if params.stop and (cut := _find_stop(seq.text, params.stop, seq.sent)) is not None:
            seq.text = seq.text[:cut]
            self._finish(seq, "stop")
        elif token in stop_ids or len(seq.output) >= params.max_tokens:
            if seq.decoder is not None:
                seq.text += seq.decoder.flush()
            self._finish(seq, "stop" if token in stop_ids else "length")

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.sequences:
            hold = 0 if seq.finish_reason else _stop_prefix_len(seq.text, request.params.stop)
            visible = len(seq.text) - hold
            outputs.append(
                CompletionOutput(
                    seq.index,
                    seq.text[:visible],
                    list(seq.output),
                    seq.finish_reason,
                    list(seq.logprobs) if request.params.logprobs is not None else None,
                    delta=seq.text[seq.sent : visible],
                )
            )
            seq.sent = max(seq.sent, visible)
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request.request_id, request.prompt, outputs, finished, request.prompt_logprobs
        )


# The share of a batched prefill's tokens, or of the keys it reads, that may be padding.
PADDING_WASTE = 0.25


def prefill_groups(chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """Prompt chunks batched into padded forward passes: in order of length, each joins the
    first batch where at most PADDING_WASTE of the tokens and of the keys read would be
    padding. (A pass per prompt cost ~1 ms of Python each on the demo model, all of it
    holding the GIL: 100 arrivals froze a server's event loop for 125 ms.)"""
    groups: list[list[tuple[Sequence, int]]] = []
    for chunk in sorted(chunks, key=lambda c: c[1]):
        group = next((g for g in groups if _padding([*g, chunk]) <= PADDING_WASTE), None)
        if group is None:
            groups.append([chunk])
        else:
            group.append(chunk)
    return groups


def _padding(group: list[tuple[Sequence, int]]) -> float:
    lengths = [n for _, n in group]
    ends = [s.computed + n for s, n in group]
    return 1 - min(sum(lengths) / max(lengths), sum(ends) / max(ends)) / len(group)


def _find_stop(text: str, stops: list[str], since: int) -> int | None:
    """Where the first stop string starts in text (searching only what may be new)."""
    start = max(0, since - max(len(s) for s in stops))
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string: held back
    from streaming until it is known not to."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
