"""Multiple choice, generation tasks and the lm-evaluation-harness adapter, on the engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mistral_nemo import LLM, InvalidRequestError, SamplingParams
from mistral_nemo.eval import tasks

DATA = Path(tasks.__file__).with_name("data")
MC = DATA / "general_knowledge_mc.jsonl"


def lm_eval_task(path: Path) -> dict:
    """The same task as lm-eval sees it: MMLU's prompt and letters, from our file."""
    listed = "".join(f"\n{letter}. {{{{choices[{i}]}}}}" for i, letter in enumerate("ABCD"))
    return {
        "task": "general_knowledge_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
        "{{subject}}.\n\n",
        "doc_to_text": "{{question.strip()}}" + listed + "\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


@pytest.fixture(scope="module")
def llm(tiny_mistral):
    return LLM(tiny_mistral, kv_cache_memory="64MiB")


def test_the_project_file_has_50_questions():
    questions = tasks.read_questions(MC)
    assert len(questions) >= 50
    assert {q.answer for q in questions} == {0, 1, 2, 3}


def test_multiple_choice_scores_identically_through_lm_eval(llm, tiny_mistral, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import mistral_nemo.eval.lm_eval_adapter  # noqa: F401 (registers the model type)

    ours = tasks.run_multiple_choice(llm, tasks.read_questions(MC))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(lm_eval_task(MC)))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    theirs = lm_eval.simple_evaluate(
        model="mistral-nemo",
        model_args=f"pretrained={tiny_mistral}",
        tasks=["general_knowledge_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    metrics = theirs["results"]["general_knowledge_mc"]
    assert metrics["acc,none"] == ours.acc and metrics["acc_norm,none"] == ours.acc_norm
    samples = sorted(theirs["samples"]["general_knowledge_mc"], key=lambda s: s["doc_id"])
    for sample, lls in zip(samples, ours.loglikelihoods, strict=True):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)


def test_loglikelihoods_are_the_models(llm, tiny_mistral):
    """A choice's score is the sum of its tokens' log-probabilities under the plain model."""
    question = tasks.read_questions(MC)[0]
    result = tasks.run_multiple_choice(llm, [question])
    model = llm.model
    for choice, ll in zip(question.choices, result.loglikelihoods[0], strict=True):
        prompt = tasks.question_prompt(question)
        context, continuation = tasks.encode_pair(llm.tokenizer, prompt, " " + choice)
        ids = context + continuation
        with torch.inference_mode():
            lp = F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
        expected = sum(float(lp[i - 1, ids[i]]) for i in range(len(context), len(ids)))
        assert ll == pytest.approx(expected, abs=1e-4)


def test_acc_norm_divides_by_characters(llm, tmp_path):
    rows = [{"context": "The cat sat on the", "choices": ["mat", "mat mat mat mat"], "answer": 1}]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = tasks.run_multiple_choice(llm, tasks.read_questions(path))
    lls = result.loglikelihoods[0]
    normed = [lls[0] / 3, lls[1] / 15]
    assert result.acc == float(lls[1] > lls[0])
    assert result.acc_norm == float(normed[1] > normed[0])


def test_generation_exact_match_and_regex(llm, tmp_path):
    prompts = ["The capital of France is", "One, two, three,"]
    greedy = SamplingParams(temperature=0, max_tokens=8, stop=["\n\n"])
    said = [o.outputs[0].text for o in llm.generate(prompts, greedy)]
    examples = [
        tasks.GenerationExample(p, [s.strip().upper()]) for p, s in zip(prompts, said, strict=True)
    ]
    result = tasks.run_generation(llm, examples, max_tokens=8)
    assert result.exact_match == 1.0 and result.outputs == said
    wrong = [tasks.GenerationExample(p, ["no such answer"]) for p in prompts]
    assert tasks.run_generation(llm, wrong, max_tokens=8).exact_match == 0.0
    first_word = r"(\S+)"
    examples = [
        tasks.GenerationExample(p, [s.split()[0]]) for p, s in zip(prompts, said, strict=True)
    ]
    assert tasks.run_generation(llm, examples, max_tokens=8, regex=first_word).exact_match == 1.0


def test_a_bad_task_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"question": "Q?", "choices": ["a", "b"], "answer": "B"}
    path.write_text(json.dumps(good) + "\n\n" + '{"question": "Q?", "choices": ["a"]}\n')
    with pytest.raises(InvalidRequestError, match=r"bad.jsonl:3: 'choices' must be a list"):
        tasks.read_questions(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(InvalidRequestError, match=r"bad.jsonl:2: not valid JSON"):
        tasks.read_questions(path)
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(InvalidRequestError, match=r"bad.jsonl:1: needs 'prompt'"):
        tasks.read_generation_examples(path)


def test_lm_eval_rolling_and_generation(llm, tiny_mistral):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from mistral_nemo.eval.lm_eval_adapter import MistralNemoLM

    lm = MistralNemoLM(pretrained=str(tiny_mistral), max_model_len=48)
    text = "The quick brown fox jumps over the lazy dog. " * 6  # several 48-token windows
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 48
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # Every token scored once: the first window from BOS, each later one with as much of
    # the text before it as the context holds.
    expected, model = 0.0, llm.model
    for start in range(0, len(ids), 47):
        end = min(start + 47, len(ids))
        window = [llm.tokenizer.bos_id, *ids[:end]] if start == 0 else ids[end - 48 : end]
        with torch.inference_mode():
            lp = F.log_softmax(model(torch.tensor([window]))[0].float(), dim=-1)
        first = len(window) - (end - start)
        expected += sum(float(lp[i - 1, window[i]]) for i in range(first, len(window)))
    assert rolling == pytest.approx(expected, abs=1e-3)

    request = Instance("generate_until", {}, ("The capital of France is", {"until": ["."],
                       "max_gen_toks": 10}), 0)  # fmt: skip
    (text_out,) = lm.generate_until([request])
    prompt = llm.tokenizer.encode("The capital of France is", bos=True)
    direct = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=["."]))
    assert text_out == direct[0].outputs[0].text
