"""The engine against the plain generation loop: batching, paging, prefix caching, chunked
prefill and preemption must not change a single greedy token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mistral_nemo import InvalidRequestError, ModelConfig, Transformer
from mistral_nemo.engine import LLM, SamplingParams
from mistral_nemo.generate import generate
from mistral_nemo.runtime.paged import PagedKVCache
from mistral_nemo.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_mistral):
    return Transformer.from_pretrained(tiny_mistral)


@pytest.fixture(scope="module")
def tok(tiny_mistral):
    return Tokenizer.from_pretrained(tiny_mistral)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 200, (n,), generator=g).tolist()
    return [torch.randint(1000, 131072, (k,), generator=g).tolist() for k in lengths]


def alone(model, prompt, n=12):
    return list(generate(model, prompt, n, temperature=0, stop_ids=[]))


def test_batch_of_16_mixed_lengths_matches_running_each_alone(model, tok):
    batch = prompts(16)
    llm = LLM(model, tok, kv_cache_memory="64MiB")
    outputs = llm.generate(batch, GREEDY)
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.outputs[0].token_ids == alone(model, prompt)
        assert out.outputs[0].finish_reason == "length"
        assert out.usage == {
            "prompt_tokens": len(prompt),
            "completion_tokens": 12,
            "total_tokens": len(prompt) + 12,
        }


def test_prefix_cache_hit_gives_identical_output(model, tok):
    system = prompts(1, seed=1)[0] * 2  # a shared 'system prompt' of several blocks
    a, b = system + [2000, 2001, 2002], system + [3000, 3001]
    llm = LLM(model, tok, kv_cache_memory="16MiB", block_size=16)
    first = llm.generate([a], GREEDY)[0].outputs[0].token_ids
    hits_before = llm.engine.pool.hits
    second = llm.generate([b], GREEDY)[0].outputs[0].token_ids
    assert llm.engine.pool.hits - hits_before >= len(system) // 16 - 1
    assert first == alone(model, a) and second == alone(model, b)
    again = llm.generate([a], GREEDY)[0].outputs[0].token_ids  # everything cached but 1
    assert again == first


def test_chunked_prefill_logits_equal_unchunked(model):
    prompt = torch.randint(1000, 131072, (1, 300), generator=torch.Generator().manual_seed(5))
    cache = PagedKVCache(
        model.config,
        num_blocks=32,
        block_size=16,
        max_len=512,
        dtype=model.dtype,
        device=model.device,
    )
    table = list(range(19))
    with torch.no_grad():
        full = model(prompt)
        parts, start = [], 0
        for n in (128, 100, 50, 22):
            step = cache.step([table], [start], n)
            parts.append(model(prompt[:, start : start + n], cache=step))
            start += n
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4


def test_ragged_prefill_batch_equals_each_prompt_alone(model):
    """Chunks of different lengths, one after 40 cached tokens, in one padded pass: the
    logits of every real position, and the cache it leaves (read by a batched decode step
    after it), are those of each prompt run alone; padding is never written."""
    g = torch.Generator().manual_seed(9)
    full = [torch.randint(1000, 131072, (n,), generator=g).tolist() for n in (31, 18, 66)]
    cache = PagedKVCache(model.config, 32, 16, 128, model.dtype, model.device)
    tables = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    starts, lengths = [0, 0, 40], [30, 17, 25]
    with torch.no_grad():
        model(torch.tensor([full[2][:40]]), cache=cache.step(tables[2:], [0], 40))
        rows = list(zip(full, starts, lengths, strict=True))
        chunk = [f[s : s + n] + [0] * (max(lengths) - n) for f, s, n in rows]
        ragged = model(torch.tensor(chunk), cache=cache.step(tables, starts, lengths))
        last = torch.tensor([[f[s + n]] for f, s, n in rows])
        after = model(last, cache=cache.step(tables, [s + n for _, s, n in rows], 1))
        for i, (f, s, n) in enumerate(rows):
            reference = model(torch.tensor([f[: s + n + 1]]))[0]
            assert (ragged[i, :n] - reference[s : s + n]).abs().max() <= 1e-4
            assert (after[i, 0] - reference[s + n]).abs().max() <= 1e-4


def test_prefill_groups_bound_the_padding():
    from mistral_nemo.engine.engine import PADDING_WASTE, prefill_groups

    class Seq:  # what the grouping reads of a sequence
        def __init__(self, computed):
            self.computed = computed

    chunks = [(Seq(0), n) for n in (30, 3, 28, 29, 31, 200, 190)] + [(Seq(4000), 30)]
    groups = prefill_groups(chunks)
    assert sorted(len(g) for g in groups) == [1, 1, 2, 4]  # 3 | 28-31 | 190, 200 | cached
    for group in groups:
        lengths = [n for _, n in group]
        assert 1 - sum(lengths) / (len(group) * max(lengths)) <= PADDING_WASTE


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(model, tok):
    llm = LLM(model, tok, kv_cache_memory="64MiB", max_num_batched_tokens=64)
    short, long = prompts(1, seed=2)[0][:10], prompts(1, seed=3)[0] * 3
    outs = llm.generate([short, long], GREEDY)
    assert outs[0].outputs[0].token_ids == alone(model, short)
    assert outs[1].outputs[0].token_ids == alone(model, long)


def test_preemption_under_a_tiny_pool_completes_everything_identically(model, tok):
    batch = prompts(8, seed=4)
    # 24 blocks of 16 tokens: far less than 8 sequences of up to ~250 tokens need at once.
    per_block = model.config.kv_bytes_per_token(model.dtype) * 16
    llm = LLM(model, tok, kv_cache_memory=24 * per_block, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outputs = llm.generate(batch, params)
    assert llm.engine.preemptions > 0
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.outputs[0].token_ids == alone(model, prompt, 48)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks  # nothing leaked


def test_32k_prompt_on_tiny_with_kv_memory_from_the_formula(tiny_mistral, tok):
    model = Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
    n = 32 * 1024
    per_token = model.config.kv_bytes_per_token(torch.bfloat16)
    llm = LLM(model, tok, kv_cache_memory=(n + 16) * per_token, max_num_batched_tokens=4096)
    assert llm.kv_cache_bytes == (n + 16) * per_token
    assert per_token == 2 * 2 * 2 * 32 * 2  # K,V x layers x kv heads x head_dim x bf16
    prompt = (prompts(1, seed=6)[0] * 200)[: n - 4]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_over_long_prompt_is_a_clear_error(model, tok):
    small = Transformer(model.config.replace(max_seq_len=64))
    llm = LLM(small, tok, kv_cache_memory="1MiB")
    with pytest.raises(
        InvalidRequestError,
        match="prompt of 60 tokens plus max_tokens 12 exceeds the context of 64 tokens",
    ):
        llm.generate([[1000] * 60], GREEDY)
    big = LLM(model, tok, kv_cache_memory=4 * 16 * model.config.kv_bytes_per_token(model.dtype))
    with pytest.raises(InvalidRequestError, match="does not fit the KV cache"):
        big.generate([[1000] * 100], GREEDY)


def test_sampling_params_and_outputs(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    params = SamplingParams(
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        min_p=0.01,
        seed=3,
        n=3,
        max_tokens=8,
        ignore_eos=True,
        logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.2,
    )
    a = llm.generate(["Hello there"], params)[0]
    b = llm.generate(["Hello there"], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]  # seeded
    assert len(a.outputs) == 3 and len({tuple(o.token_ids) for o in a.outputs}) > 1
    lp = a.outputs[0].logprobs
    assert len(lp) == 8 and len(lp[0].top) == 2 and lp[0].logprob <= 0
    assert a.usage["completion_tokens"] == 24


def test_seeded_sampling_is_the_same_alone_and_batched(model, tok):
    """Rows that sample alike are drawn together (one softmax for the batch); a seeded
    request still draws what it draws alone."""
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    batch = prompts(6, seed=8)
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, min_p=0.02, seed=i, max_tokens=6)
        for i in range(len(batch))
    ]
    pairs = list(zip(batch, params, strict=True))
    alone = [llm.generate([p], q)[0].outputs[0].token_ids for p, q in pairs]
    ids = [llm.engine.add_request(p, q) for p, q in pairs]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert [done[i].outputs[0].token_ids for i in ids] == alone


def test_stop_strings_and_stop_ids(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    free = llm.generate(["Once"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[
        0
    ].outputs[0]
    stop_token = free.token_ids[4]
    by_id = llm.generate(
        ["Once"], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_token])
    )[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:5] and by_id.finish_reason == "stop"
    piece = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    if piece.strip():
        by_text = llm.generate(
            ["Once"], SamplingParams(temperature=0, max_tokens=10, stop=[piece], ignore_eos=True)
        )[0].outputs[0]
        assert by_text.finish_reason == "stop" and piece not in by_text.text
        assert free.text.startswith(by_text.text)


def test_streaming_deltas_add_up(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    deltas, last = [], None
    for out in llm.stream("Hello", params):
        deltas.append(out.outputs[0].delta)
        last = out
    assert last.finished and "".join(deltas) == last.outputs[0].text
    assert last.outputs[0].text == llm.generate(["Hello"], params)[0].outputs[0].text
    assert not llm.engine.has_unfinished()


def test_abort_frees_blocks(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    rid = llm.engine.add_request(prompts(1)[0], GREEDY)
    llm.engine.step()
    assert llm.engine.pool.num_free < llm.engine.pool.num_blocks
    llm.engine.abort(rid)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    assert not llm.engine.has_unfinished()


def test_chat_with_tools_reports_tool_calls(model, tok, monkeypatch):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    call = [
        tok.control_id("[TOOL_CALLS]"),
        *tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
        tok.eos_id,
    ]
    forced = iter(call)
    # Drive the model's choice: the engine must turn these tokens into an OpenAI tool call.
    import mistral_nemo.engine.engine as engine_module

    def fake_sample(logits, params, prompts, outputs, generators):
        return [next(forced)], [None]

    monkeypatch.setattr(engine_module, "sample_batch", fake_sample)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    out = llm.chat(
        [{"role": "user", "content": "Weather in Paris?"}],
        SamplingParams(temperature=0, max_tokens=64),
        tools=tools,
    )[0].outputs[0]
    assert out.finish_reason == "tool_calls"
    assert out.tool_calls[0]["name"] == "get_weather"
    assert out.tool_calls[0]["arguments"] == '{"city": "Paris"}'


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"max_tokens": 0},
        {"n": 0},
        {"logprobs": 50},
        {"presence_penalty": 3},
        {"stop": [""]},
        {"min_p": 2},
    ],
)
def test_invalid_sampling_params(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def test_kv_memory_sizes_the_pool(model, tok):
    per_block = model.config.kv_bytes_per_token(model.dtype) * 16
    llm = LLM(model, tok, kv_cache_memory="1MiB")
    assert llm.engine.pool.num_blocks == 2**20 // per_block
    assert ModelConfig.preset("nemo-12b").kv_bytes_per_token(torch.bfloat16) * 16 == 2.5 * 2**20


def test_banned_tokens(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    free = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    first = free[0].outputs[0].token_ids[0]
    banned = llm.generate(
        ["Hi"],
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, banned_token_ids=[first]),
    )
    assert banned[0].outputs[0].token_ids[0] != first


def test_fp8_kv_cache_halves_memory_and_keeps_logits_close(tiny_mistral, tok):
    model = Transformer.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
    prompt = torch.randint(1000, 131072, (1, 200), generator=torch.Generator().manual_seed(9))
    logits = {}
    for kv in (None, torch.float8_e4m3fn):
        cache = PagedKVCache(
            model.config,
            num_blocks=16,
            block_size=16,
            max_len=256,
            dtype=model.dtype,
            device=model.device,
            kv_dtype=kv,
        )
        with torch.no_grad():
            parts = [model(prompt[:, :150], cache=cache.step([list(range(16))], [0], 150))]
            for i in range(150, 200):  # decode reads the FP8 blocks back
                parts.append(
                    model(prompt[:, i : i + 1], cache=cache.step([list(range(16))], [i], 1))
                )
        logits[kv] = torch.cat(parts, dim=1).float()
        assert cache.k.dtype == (kv or torch.bfloat16)
    a, b = logits[None], logits[torch.float8_e4m3fn]
    cos = F.cosine_similarity(a.flatten(1), b.flatten(1)).item()
    assert cos > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    bf16 = LLM(model, tok, kv_cache_memory="4MiB")
    fp8 = LLM(model, tok, kv_cache_memory="4MiB", kv_cache_dtype="fp8")
    assert fp8.engine.pool.num_blocks == 2 * bf16.engine.pool.num_blocks
    assert fp8.kv_cache_bytes == bf16.kv_cache_bytes
    out = fp8.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


def test_prompt_logprobs_are_the_full_forwards_log_softmax(model, tok):
    """Scoring a prompt (evaluation): the logprob of each prompt token from
    prompt_logprobs_from on, as log_softmax of the plain forward pass gives it, across
    chunked prefill; with max_tokens 0 nothing is generated."""
    prompt = prompts(1, seed=7)[0] + prompts(1, seed=8)[0]
    llm = LLM(model, tok, kv_cache_memory="16MiB", max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=0, prompt_logprobs=2, prompt_logprobs_from=5)
    out = llm.generate([prompt], params)[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    with torch.inference_mode():
        reference = F.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    got = out.prompt_logprobs
    assert got is not None and got[:5] == [None] * 5
    for j in range(5, len(prompt)):
        record = got[j]
        assert record is not None and record.token_id == prompt[j]
        assert abs(record.logprob - float(reference[j - 1, prompt[j]])) < 1e-4
        assert list(record.top) == torch.topk(reference[j - 1], 2).indices.tolist()


def test_scored_continuations_share_their_context_through_the_prefix_cache(model, tok):
    context = prompts(1, seed=9)[0] * 2
    choices = [[2000, 2001, 2002], [3000], [4000, 4001]]
    llm = LLM(model, tok, kv_cache_memory="16MiB", block_size=16)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_from=len(context))
    first = llm.generate([context + choices[0]], params)[0]
    hits_before = llm.engine.pool.hits
    rest = llm.generate([context + c for c in choices[1:]], params)
    assert llm.engine.pool.hits - hits_before >= 2 * (len(context) // 16 - 1)
    with torch.inference_mode():
        for choice, out in zip(choices, [first, *rest], strict=True):
            full = context + choice
            reference = F.log_softmax(model(torch.tensor([full]))[0].float(), dim=-1)
            expected = [float(reference[j - 1, full[j]]) for j in range(len(context), len(full))]
            got = [r.logprob for r in out.prompt_logprobs[len(context) :]]
            assert got == pytest.approx(expected, abs=1e-4)


def test_prompt_logprobs_settings_are_checked(model, tok):
    llm = LLM(model, tok, kv_cache_memory="16MiB")
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="leaves no token"):
        llm.generate(
            [[5, 6, 7]], SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_from=3)
        )
