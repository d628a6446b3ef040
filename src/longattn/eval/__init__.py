"""Evaluation: long-context tasks, the eval loop, fidelity, perplexity, recall-vs-state, and reports."""
