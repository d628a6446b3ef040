"""Evaluation: long-context tasks, the eval loop, fidelity, perplexity and reports."""
