"""Diagnostic for Quest's accuracy (issue 4): the same page selection, ranked by each page's *exact* best score
max_{k in page} q·k instead of Quest's min/max upper bound. Not a method (choosing reads every key); it separates
"page selection at this budget loses the answer" from "the bound ranks the wrong pages".
Usage: python benchmarks/quest_exact_pages.py eval ... --decode "quest_exact:budget=992:share_group=True:..."
(any `longattn` command line; it registers `quest_exact` first)."""

import importlib
import math
import sys

import torch

from longattn.cli import main
from longattn.methods import register

quest = importlib.import_module("longattn.methods.decode.quest")


def exact_page_scores(q: torch.Tensor, layer) -> torch.Tensor:
    """[B, Hq, n_pages]: max over each page's kept keys of q·k / sqrt(D) (-inf for empty pages)."""
    B, Hq, _, D = q.shape
    keys = layer.keys.float()
    Hkv, cap, ps = keys.shape[1], keys.shape[2], layer.page_size
    s = torch.einsum("bhgd,bhsd->bhgs", q.float().reshape(B, Hkv, Hq // Hkv, D), keys) / math.sqrt(D)
    kept = torch.arange(cap, device=keys.device) < layer.lengths[..., None]
    s = s.masked_fill(~kept[:, :, None], float("-inf"))
    n_pages = layer.page_min.shape[2]
    s = torch.nn.functional.pad(s, (0, n_pages * ps - cap), value=float("-inf"))
    return s.reshape(B, Hkv, Hq // Hkv, n_pages, ps).amax(-1).reshape(B, Hq, n_pages)


@register("quest_exact", "decode", paper="diagnostic: Quest ranked by exact page maxima")
class QuestExactPages(quest.Quest):
    """Quest with ``page_scores`` (the bound) replaced by the exact page maxima for its own calls."""

    def select(self, layer_idx, q, layer):
        bound = quest.page_scores

        def exact(q_, lo, hi, reduce):
            s = exact_page_scores(q_, layer)  # [B, Hq, n_pages]
            return s if reduce == "none" else s.unflatten(1, (lo.shape[1], -1)).amax(2)

        quest.page_scores = exact
        try:
            return super().select(layer_idx, q, layer)
        finally:
            quest.page_scores = bound


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
