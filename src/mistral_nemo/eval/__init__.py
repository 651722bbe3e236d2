"""Evaluation: perplexity, multiple-choice and generation tasks, long-context retrieval and
an lm-evaluation-harness adapter, on the engine."""
