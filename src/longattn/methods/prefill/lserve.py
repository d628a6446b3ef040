"""LServe's prefill (Yang et al. 2025): a fixed share of heads become *streaming* heads (attention sinks plus a
local window, nearly free), the others stay dense or block-sparse; one BlockSparse holds both kinds."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill._blocks import geometry, square_block, to_block_sparse
from longattn.methods.prefill._select import check_budget, check_fraction, check_int
from longattn.methods.prefill.base import PrefillMethod, pooled_block_scores
from longattn.methods.registry import register


@register("lserve", "prefill", paper="LServe (Yang et al. 2025), streaming heads + block-sparse dense heads")
class LServePrefill(PrefillMethod):
    """Head types come from ``streaming_heads`` (a static per-layer config: ``{layer: [query heads]}`` or a JSON
    file of it, e.g. from a DuoAttention-style calibration; unlisted layers have none) or, when it is None, from a
    score: the ``streaming_ratio`` share of heads whose pooled block attention puts the most mass on the sink and
    local blocks.
    Streaming heads keep ``num_sinks`` first tokens and a ``window`` of recent ones (token-exact); the other heads
    keep every causal block, or their ``top_k`` kv blocks by pooled q·k score when ``top_k`` is set.

    Defaults: half the heads streaming (LServe), 64 sink and 256 local tokens (DuoAttention's streaming heads,
    which LServe adopts), dense remaining heads, block 64. Sink or window budgets over the context are errors.
    """

    def __init__(self, streaming_heads: Mapping[int, Sequence[int]] | str | Path | None = None,
                 streaming_ratio: float = 0.5, num_sinks: int = 64, window: int = 256, top_k: int | None = None,
                 block: int = 64):
        self.streaming_heads = _load_heads(streaming_heads)
        self.streaming_ratio = check_fraction("streaming_ratio", streaming_ratio, low_open=False)
        self.num_sinks = check_int("num_sinks", num_sinks, low=0)
        self.window = check_int("window", window)
        self.top_k = None if top_k is None else check_int("top_k", top_k)
        self.block = square_block(block)
        self.last_streaming: Tensor | None = None  # bool [Hq] head types of the last estimate

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, _ = q.shape
        Skv = k.shape[2]
        check_budget("num_sinks", self.num_sinks, Skv, "tokens")
        check_budget("window", self.window, Skv, "tokens")
        geo = geometry(Sq, Skv, self.block, q.device)
        streaming_blocks = (geo.kv_first < self.num_sinks).view(1, -1) | geo.window(
            torch.tensor(self.window, device=q.device))
        scores = pooled_block_scores(q, k, self.block) if self.top_k is not None or self.streaming_heads is None \
            else None
        streaming = self._streaming(layer, Hq, scores, streaming_blocks, q.device)  # bool [Hq]
        if self.top_k is None:
            dense_blocks = torch.ones(B, Hq, *geo.area.shape, dtype=torch.bool, device=q.device)
        else:
            check_budget("top_k", self.top_k, geo.kv_first.numel(), "kv blocks")
            top = scores.topk(self.top_k, dim=-1).indices
            dense_blocks = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        selected = torch.where(streaming.view(1, Hq, 1, 1), streaming_blocks, dense_blocks)
        # Dense heads: a window longer than the context; streaming heads: sinks + window. Both masks have block
        # bounds, so the builder settles whole blocks without evaluating them token by token (at 128k an
        # unbounded rule meant ~10^11 evaluations per layer).
        windows = torch.where(streaming, self.window, Skv + 1)
        rule = masks.per_head_window(windows, offset=geo.offset) | masks.sinks(self.num_sinks, self.window,
                                                                                offset=geo.offset)
        self.last_blocks = to_block_sparse(selected, geo, rule)
        self.last_streaming = streaming
        return self.last_blocks

    def _streaming(self, layer: int, Hq: int, scores: Tensor | None, streaming_blocks: Tensor, device) -> Tensor:
        """bool [Hq]: which query heads are streaming heads in this layer."""
        out = torch.zeros(Hq, dtype=torch.bool, device=device)
        if self.streaming_heads is not None:
            heads = list(self.streaming_heads.get(layer, ()))
            bad = [h for h in heads if not 0 <= h < Hq]
            if bad:
                raise ValueError(f"streaming_heads: layer {layer} lists heads {bad}, expected indices in [0, {Hq})")
            out[heads] = True
            return out
        n = round(self.streaming_ratio * Hq)
        if n:
            local_mass = (scores * streaming_blocks).sum(-1).mean(dim=(0, 2))  # [Hq]
            out[local_mass.topk(n).indices] = True
        return out


def _load_heads(spec) -> dict[int, list[int]] | None:
    """``{layer: [heads]}`` from a mapping or a JSON file with string layer keys."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        spec = json.loads(Path(spec).read_text())
    if not isinstance(spec, Mapping):
        raise TypeError(f"streaming_heads: expected a mapping {{layer: [heads]}} or a JSON path, got "
                        f"{type(spec).__name__}")
    try:
        return {int(layer): [int(h) for h in heads] for layer, heads in spec.items()}
    except (TypeError, ValueError):
        raise ValueError(f"streaming_heads: expected {{layer: [head indices]}}, got {spec!r}") from None
