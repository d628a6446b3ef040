"""Long-text perplexity in chunks: the model runs once over the whole text (the method under test shapes every
layer), and the loss is taken over the final hidden states ``chunk`` positions at a time, so full-vocabulary logits
for the whole text never exist at once."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.eval.tasks.haystack import sentences


def text_ids(tokenizer, n_tokens: int, haystack: str = "essay") -> Tensor:
    """The first ``n_tokens`` tokens of the haystack prose, as a [1, n] id tensor."""
    pieces, total = [], 0
    for s in sentences(haystack):
        pieces.append(s)
        total += len(s) // 3  # a cheap lower bound on tokens, checked below
        if total > 2 * n_tokens:
            break
    ids = tokenizer(" ".join(pieces), return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"length: the {haystack} haystack has only {ids.shape[1]} tokens, asked for {n_tokens}")
    return ids


@torch.no_grad()
def perplexity(model, ids: Tensor, chunk: int = 1024) -> float:
    """exp(mean next-token loss) over ``ids`` [1, n]."""
    hidden = model.model(ids, use_cache=False).last_hidden_state
    total, count = 0.0, 0
    for lo in range(0, ids.shape[1] - 1, chunk):
        hi = min(lo + chunk, ids.shape[1] - 1)
        logits = model.lm_head(hidden[:, lo:hi]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, lo + 1:hi + 1].flatten(), reduction="sum"))
        count += hi - lo
    return math.exp(total / count)
