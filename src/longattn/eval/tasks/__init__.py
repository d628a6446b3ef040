"""Long-context tasks generated offline: needle-in-a-haystack, passkey and the RULER families."""

from longattn.eval.tasks.needles import TASKS, Sample, make_sample, score

__all__ = ["TASKS", "Sample", "make_sample", "score"]
