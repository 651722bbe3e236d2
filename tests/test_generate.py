import pytest
import torch

from mistral_nemo import InvalidRequestError, Transformer
from mistral_nemo.generate import generate
from mistral_nemo.sampling import sample


@pytest.fixture(scope="module")
def model(tiny_mistral):
    return Transformer.from_pretrained(tiny_mistral)


PROMPT = [1, 22177, 1044, 4304, 1033]


def test_seed_makes_sampling_reproducible(model):
    a = list(generate(model, PROMPT, 24, temperature=1.0, seed=5, stop_ids=[]))
    b = list(generate(model, PROMPT, 24, temperature=1.0, seed=5, stop_ids=[]))
    c = list(generate(model, PROMPT, 24, temperature=1.0, seed=6, stop_ids=[]))
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = list(generate(model, PROMPT, 16, temperature=0, stop_ids=[]))
    assert (
        list(generate(model, PROMPT, 16, temperature=2.0, top_k=1, seed=0, stop_ids=[])) == greedy
    )
    assert (
        list(generate(model, PROMPT, 16, temperature=2.0, top_p=1e-6, seed=0, stop_ids=[]))
        == greedy
    )


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    # top_p keeps the smallest set of tokens whose mass reaches p: here {3, 2} (0.64 + 0.24).
    draws = {int(sample(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    assert int(sample(logits, 0.0)) == 3


def test_stops_on_stop_id_and_max_tokens(model):
    greedy = list(generate(model, PROMPT, 10, temperature=0, stop_ids=[]))
    assert len(greedy) == 10
    stopped = list(generate(model, PROMPT, 10, temperature=0, stop_ids=[greedy[3]]))
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_settings(model, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        list(generate(model, PROMPT, **kwargs))


def test_prompt_longer_than_context(model):
    small = Transformer(model.config.replace(max_seq_len=8))
    with pytest.raises(
        InvalidRequestError,
        match="prompt of 6 tokens plus max_tokens 4 exceeds the model's context of 8 tokens",
    ):
        list(generate(small, [1] * 6, max_tokens=4))
    with pytest.raises(InvalidRequestError, match="empty"):
        list(generate(model, [], max_tokens=4))
    with pytest.raises(InvalidRequestError, match="token ids"):
        list(generate(model, [131072], max_tokens=4))


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, 1.0, generator=g) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.015
    # temperature sharpens: logits / 0.5
    draws = torch.cat([sample(logits, 0.5, generator=g) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - (logits / 0.5).softmax(-1)[0]).abs().max() < 0.015


def test_top_p_over_a_flat_vocabulary_ranks_everything():
    # 131072 near-equal logits: the 1024 best hold < top_p, so the full ranking is used.
    logits = torch.linspace(0, 1e-3, 131072)[None]
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(300)])
    assert (draws >= 131072 // 2 - 200).all()  # only the upper (more likely) half
    assert len(set(draws.tolist())) > 250


def test_batched_sampling_is_per_row():
    logits = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]])
    assert sample(logits, 1.0, top_k=2).tolist() == [1, 0]
    assert sample(logits, 1.0, top_p=0.9).tolist() == [1, 0]
