"""Evaluation: perplexity, multiple-choice and generation tasks, long-context retrieval and
an lm-evaluation-harness adapter (`eval.lm_eval_adapter`, which needs the `eval` extra), on
the engine."""

from mistral_nemo.eval.loglikelihood import Score, score_continuations
from mistral_nemo.eval.needle import run_needle, save_report
from mistral_nemo.eval.perplexity import PerplexityResult, evaluate_perplexity
from mistral_nemo.eval.tasks import run_generation, run_multiple_choice
from mistral_nemo.eval.tool_calls import score_tool_calls, to_text_tools

__all__ = [
    "PerplexityResult",
    "Score",
    "evaluate_perplexity",
    "run_generation",
    "run_multiple_choice",
    "run_needle",
    "save_report",
    "score_continuations",
    "score_tool_calls",
    "to_text_tools",
]
