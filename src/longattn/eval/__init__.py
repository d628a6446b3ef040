"""Evaluation: tasks, fidelity, recall-vs-state (one module per job)."""
