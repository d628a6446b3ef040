"""Quest (Tang et al., 2024), as also used by LServe: keep everything, read little. Each page of ``page_size``
tokens keeps its keys' per-channel min/max; a query bounds each page's best score from them and reads only the
top pages per query head. Scoring reads every page's bounds each step: 1 / ``page_size`` of the cache on top of
the selected pages (the eval's read fraction counts both).

The first ``sink_pages`` pages (default 1) are always read, out of the budget. The bound alone misses attention
sinks: on SmolLM2-135M, heads that park ~all their attention on the first token (no-op heads) have that page's
bound ranked near last (498th of 500 pages at 8k in layer 18), because every ordinary page's per-channel spread
bounds higher than the sink's real score; those heads then read none of their attention and the answer breaks
(issue 4). ``sink_pages=0`` is the paper's pure top-k.

Quest was written for multi-head models. With grouped-query attention each query head picking its own pages makes a
kv head's reads the union of its group's picks (up to group × budget); ``share_group=True`` ranks pages by the
group's best bound and reads one set per kv head, so the read is ``budget`` tokens per kv head."""

from __future__ import annotations

import torch

from longattn.hf.cache import PageSelection
from longattn.kernels.page_select import page_scores
from longattn.methods.decode.base import DecodePolicy, check_int
from longattn.methods.registry import register


@register("quest", "decode", paper="Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (2024)")
class Quest(DecodePolicy):
    """Read ``budget // page_size`` pages per query head: the page holding the newest token and the first
    ``sink_pages`` pages always, the rest by the bound; the first ``dense_layers`` layers read everything, as in
    the paper."""

    budget_is_cap = True  # a read budget: at or above the context, every page is read

    def __init__(self, budget: int = 2048, page_size: int = 16, dense_layers: int = 2, sink_pages: int = 1,
                 share_group: bool = False):
        super().__init__(budget)
        if not isinstance(share_group, bool):
            raise TypeError(f"share_group: expected True or False, got {share_group!r}")
        check_int("page_size", page_size)
        check_int("dense_layers", dense_layers, minimum=0)
        check_int("sink_pages", sink_pages, minimum=0)
        if budget % page_size:
            raise ValueError(f"page_size: {page_size} does not divide budget={budget}; the budget is read in whole "
                             f"pages, pass a budget that is a multiple of page_size")
        if sink_pages + 1 > budget // page_size:
            raise ValueError(f"sink_pages: {sink_pages} sink pages and the newest page exceed the budget of "
                             f"{budget // page_size} pages; pass sink_pages <= {budget // page_size - 1}")
        self.page_size, self.dense_layers, self.sink_pages = page_size, dense_layers, sink_pages
        self.share_group = share_group

    def select(self, layer_idx, q, layer):
        if layer_idx < self.dense_layers or q.shape[2] != 1:
            return None
        Hkv = layer.keys.shape[1]
        # [B, Hkv, n_pages] (one page set per kv head, ranked by its group's best bound) or [B, Hq, n_pages]
        scores = page_scores(q, layer.page_min, layer.page_max, reduce="max" if self.share_group else "none")
        layer.note_scoring(layer.page_min.shape[0] * Hkv * layer.page_min.shape[2])  # a page's min + max: one slot
        per_kv = scores.shape[1] // Hkv
        valid = layer.page_valid().repeat_interleave(per_kv, 1)
        newest = ((layer.lengths - 1) // self.page_size).repeat_interleave(per_kv, 1)  # [B, heads]
        forced = torch.zeros_like(valid)
        forced[..., : self.sink_pages] = True
        forced.scatter_(2, newest[..., None], True)
        # forced pages rank first, then the bound; pages past a head's tokens rank last and are cut by the count
        ranked = scores.masked_fill(forced & valid, float("inf")).masked_fill(~valid, float("-inf"))
        k = min(self.budget // self.page_size, ranked.shape[-1])
        return PageSelection(ranked.topk(k, dim=-1).indices, valid.sum(-1).clamp(max=k), self.page_size)

