"""lm-evaluation-harness (0.4.x) model type `mistral-nemo`, on our engine.

Importing this module registers it. lm_eval's own command line has no plugin hook, so
`mistral-nemo eval lm-eval --model mistral-nemo --model_args pretrained=PATH ...` runs it
with the model registered; from Python, import this module and call
`lm_eval.simple_evaluate(model="mistral-nemo", model_args="pretrained=PATH", ...)`.

model_args: pretrained (checkpoint folder or .gguf; the demo model if absent), dtype
(auto/fp32/bf16), quantize (fp8/fp8-channel/int8/int4), group_size, kv_cache_dtype
(auto/fp8), max_model_len, max_num_seqs, max_gen_toks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mistral_nemo.demo import demo_model_path
from mistral_nemo.engine import LLM
from mistral_nemo.eval.loglikelihood import score_continuations
from mistral_nemo.eval.tasks import encode_pair
from mistral_nemo.sampling import SamplingParams
from mistral_nemo.tokenizer import BaseTokenizer

DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}  # fmt: skip


@register_model("mistral-nemo")
class MistralNemoLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        quantize: str | None = None,
        group_size: int = 128,
        kv_cache_dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_gen_toks: int = 256,
        **_: Any,  # lm_eval passes batch_size, device, ...: the engine batches by itself
    ) -> None:
        super().__init__()
        self.llm = LLM(
            pretrained or demo_model_path(),
            dtype=DTYPES[dtype],
            quantize=quantize,
            group_size=int(group_size),
            kv_cache_dtype=kv_cache_dtype,
            max_model_len=int(max_model_len) if max_model_len else None,
            max_num_seqs=int(max_num_seqs),
        )
        if self.llm.tokenizer is None:
            raise ValueError(f"{pretrained}: lm-eval needs the model's tokenizer")
        self.tok: BaseTokenizer = self.llm.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.llm.engine.max_model_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return self.tok.encode(string)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok, context, continuation)

    def _loglikelihood_tokens(
        self, requests: Sequence[Any], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        pairs = []
        for _key, context, continuation in requests:
            room = self.max_length - len(continuation)  # keep the context's end, as HFLM
            pairs.append((list(context)[-room:], list(continuation)))
        scores = score_continuations(self.llm, pairs, progress=not disable_tqdm)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Each text's log-likelihood in windows of the model's context, every token
        scored once (lm-eval's rolling windows)."""
        pairs, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1,  # (+ its one token of context)
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(
            owner, score_continuations(self.llm, pairs, not disable_tqdm), strict=True
        ):
            totals[i] += score.logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or as `temperature` asks) continuations cut at the `until` strings, the
        requests with the same settings batched by the engine."""
        groups: dict[tuple[float, int, tuple[str, ...]], list[int]] = {}
        prompts = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
            stop = (until,) if isinstance(until, str) else tuple(until)
            max_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((float(kwargs.get("temperature", 0.0)), max_tokens, stop), []).append(
                i
            )
            prompts.append(self.tok.encode(context, bos=True)[-(self.max_length - max_tokens) :])
        texts = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generating")
        for (temperature, max_tokens, stop), members in groups.items():
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=list(stop))
            outputs = self.llm.generate([prompts[i] for i in members], params)
            for i, out in zip(members, outputs, strict=True):
                texts[i] = out.outputs[0].text
            bar.update(len(members))
        bar.close()
        return texts


def run_lm_eval_cli(argv: Sequence[str]) -> None:
    """lm_eval's command line with `argv`, this model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
