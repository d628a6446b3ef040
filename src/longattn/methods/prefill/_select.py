"""Selection helpers shared by the dynamic prefill methods: causal block geometry, last-query attention, token-level
column / diagonal patterns (MInference's vertical-slash and A-shape heads), budget checks, and the one place a
selection becomes a BlockSparse together with the density it reports."""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse, ResolvedMask
from longattn.masks.core import MaskMod

log = logging.getLogger("longattn")
TOKEN_LEVEL_MAX_ELEMS = 1 << 27  # elements of partly kept blocks above which token patterns fall back to whole blocks


def check_int(name: str, value, *, low: int = 1) -> int:
    """A plain int >= low, else ValueError naming the knob."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def check_fraction(name: str, value, *, low_open: bool = True, high: float = 1.0) -> float:
    """A float in (0, high] (or [0, high] with low_open=False), else ValueError naming the knob."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
    ok = ok and (value > 0 if low_open else value >= 0)
    if not ok:
        raise ValueError(f"{name}: expected a number in {'(' if low_open else '['}0, {high:g}], got {value!r}")
    return float(value)


def check_block(name: str, value) -> int:
    """A power-of-two block size >= 32 (what the kernels take)."""
    if not isinstance(value, int) or value < 32 or value & (value - 1):
        raise ValueError(f"{name}: expected a power of two >= 32, got {value!r}")
    return value


def check_budget(name: str, value: int, context: int, unit: str = "tokens") -> None:
    """Budgets larger than the context are a caller error, never silently clipped to dense."""
    if value > context:
        raise ValueError(f"{name}: budget of {value} {unit} exceeds the context of {context} {unit}; pass at most "
                         f"{context}")


def qk_samples(model_or_samples, input_ids: Tensor | None) -> list[tuple[int, Tensor, Tensor]]:
    """Calibration data as (layer, q, k): captured from a transformers model run on ``input_ids``, or given."""
    if input_ids is not None:
        from longattn.methods.prefill._capture import capture_qk

        return capture_qk(model_or_samples, input_ids)
    if hasattr(model_or_samples, "config"):
        raise ValueError("input_ids: a model needs calibration token ids (input_ids=[B, S] tensor), got None")
    return list(model_or_samples)


@functools.lru_cache(maxsize=8)
def resolved_causal(Sq: int, Skv: int, block: tuple[int, int], device: torch.device | str) -> ResolvedMask:
    """The bottom-right causal mask resolved once per grid (see ``ResolvedMask``): every layer of a prefill, and
    every later prefill of the same length, classifies its listed blocks by lookup."""
    return ResolvedMask.build(masks.causal(offset=Skv - Sq), Sq, Skv, block, device=device)


def geometry(Sq: int, Skv: int, block: tuple[int, int], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Absolute token bounds (inclusive) of every query block and kv block: q_lo, q_hi [nQB], kv_lo, kv_hi [nKB]."""
    bq, bkv = block
    off = Skv - Sq
    q_lo = torch.arange(0, Sq, bq, device=device)
    kv_lo = torch.arange(0, Skv, bkv, device=device)
    return q_lo + off, (q_lo + bq - 1).clamp(max=Sq - 1) + off, kv_lo, (kv_lo + bkv - 1).clamp(max=Skv - 1)


def causal_blocks(Sq: int, Skv: int, block: tuple[int, int], device) -> Tensor:
    """bool [nQB, nKB]: blocks holding at least one causal (bottom-right) pair."""
    _, q_hi, kv_lo, _ = geometry(Sq, Skv, block, device)
    return kv_lo.view(1, -1) <= q_hi.view(-1, 1)


def diagonal_blocks(Sq: int, Skv: int, block: tuple[int, int], device) -> Tensor:
    """bool [nQB, nKB]: for each query block, the kv block of its last query (kept so no row is ever empty)."""
    _, q_hi, kv_lo, _ = geometry(Sq, Skv, block, device)
    return (q_hi // block[1]).view(-1, 1) == torch.arange(kv_lo.numel(), device=device).view(1, -1)


def repeat_kv(k: Tensor, heads: int) -> Tensor:
    """kv heads repeated to the query heads (GQA): estimates are made per query head."""
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def last_q_attention(q: Tensor, k: Tensor, last_q: int) -> Tensor:
    """Causal softmax of the last ``last_q`` queries over all keys, float32 [B, Hq, L, Skv]: O(L · Skv) memory."""
    L, Skv = min(last_q, q.shape[2]), k.shape[2]
    qt = q[:, :, -L:].float()
    s = qt @ repeat_kv(k, q.shape[1]).float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    pos = torch.arange(Skv - L, Skv, device=q.device).view(-1, 1)
    s = s.masked_fill(torch.arange(Skv, device=q.device).view(1, -1) > pos, float("-inf"))
    return torch.softmax(s, dim=-1)


def vertical_slash_scores(p: Tensor) -> tuple[Tensor, Tensor]:
    """From last-query attention p [B, H, L, Skv]: column mass [B, H, Skv] and diagonal mass [B, H, Skv], where
    diagonal d holds the pairs with query position - key position = d (one reversed row add per query)."""
    L, Skv = p.shape[2], p.shape[3]
    slash = torch.zeros(p.shape[:2] + (Skv,), dtype=p.dtype, device=p.device)
    for i in range(L):
        n = Skv - L + i + 1  # keys visible to the i-th of the last queries
        slash[..., :n] += p[:, :, i, :n].flip(-1)
    return p.sum(2), slash


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """bool mask of the k largest entries along the last dim."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def cumulative_mask(scores: Tensor, gamma: float) -> Tensor:
    """bool mask of the fewest largest entries (last dim) whose share of the total reaches gamma (FlexPrefill)."""
    total = scores.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    vals, idx = (scores / total).sort(dim=-1, descending=True)
    before = vals.cumsum(-1) - vals  # mass of the strictly larger entries
    keep = before < gamma if gamma < 1.0 else torch.ones_like(before, dtype=torch.bool)
    return torch.zeros_like(keep).scatter_(-1, idx, keep)


def _prefix(x: Tensor) -> Tensor:
    return torch.nn.functional.pad(x.long().cumsum(-1), (1, 0))


def _range_count(prefix: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Set entries in [lo, hi] (inclusive, broadcasting index tensors) per row of prefix [..., S + 1]; 0 if hi < lo."""
    return prefix[..., torch.maximum(hi, lo - 1) + 1] - prefix[..., lo]


def token_blocks(columns: Tensor, diagonals: Tensor, Sq: int, Skv: int, block: tuple[int, int]) -> Tensor:
    """bool [B, H, nQB, nKB]: exactly the blocks holding a causal pair on a kept column or kept diagonal
    (columns, diagonals: bool [B, H, Skv]; diagonal d = query position - key position)."""
    q_lo, q_hi, kv_lo, kv_hi = (t.view(-1, 1) if i < 2 else t.view(1, -1)
                                for i, t in enumerate(geometry(Sq, Skv, block, columns.device)))
    col = _range_count(_prefix(columns), kv_lo, torch.minimum(kv_hi, q_hi)) > 0
    diag = _range_count(_prefix(diagonals), (q_lo - kv_hi).clamp(min=0), q_hi - kv_lo) > 0
    return col | diag


def token_covered_blocks(columns: Tensor, diagonals: Tensor, Sq: int, Skv: int, block: tuple[int, int]) -> Tensor:
    """bool [B, H, nQB, nKB]: blocks whose every (causal) pair is on a kept column or a kept diagonal; these need
    no bit tile, so only the others count towards the token-level size limit."""
    q_lo, q_hi, kv_lo, kv_hi = (t.view(-1, 1) if i < 2 else t.view(1, -1)
                                for i, t in enumerate(geometry(Sq, Skv, block, columns.device)))
    d_lo, d_hi = (q_lo - kv_hi).clamp(min=0), (q_hi - kv_lo).clamp(min=0)
    whole_cols = _range_count(_prefix(columns), kv_lo, kv_hi) == kv_hi - kv_lo + 1
    return whole_cols | (_range_count(_prefix(diagonals), d_lo, d_hi) == d_hi - d_lo + 1)


def token_mask_mod(columns: Tensor, diagonals: Tensor, offset: int) -> MaskMod:
    """Elementwise ``kv on a kept column or (q - kv) on a kept diagonal``, per (batch, head); the block bounds
    mark blocks wholly covered by kept columns or diagonals (in every batch) so they need no bit tile."""
    S = columns.shape[-1]
    cols_all, diags_all = _prefix(columns.all(0)), _prefix(diagonals.all(0))

    def token_pattern(b, h, q, kv):
        return columns[b, h, kv.clamp(0, S - 1)] | diagonals[b, h, (q + offset - kv).clamp(0, S - 1)]

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        d_lo, d_hi = (q_lo + offset - kv_hi).clamp(0, S - 1), (q_hi + offset - kv_lo).clamp(0, S - 1)
        whole_cols = cols_all[h, kv_hi + 1] - cols_all[h, kv_lo] == kv_hi - kv_lo + 1
        whole_diags = diags_all[h, d_hi + 1] - diags_all[h, d_lo] == d_hi - d_lo + 1
        all_ = whole_cols | whole_diags
        return torch.ones_like(all_), all_

    return MaskMod(token_pattern, bounds=bounds, name="columns_or_diagonals")


def build(selected: Tensor, Sq: int, Skv: int, block: tuple[int, int], *, columns: Tensor | None = None,
          diagonals: Tensor | None = None, token_level: bool | None = None,
          gather: Tensor | None = None) -> BlockSparse:
    """The BlockSparse for a selection (its ``density()`` counts the pairs the kernels compute: area of the
    non-empty blocks plus the gathered column pairs outside them).

    ``selected`` [B, H, nQB, nKB] is intersected with the causal blocks. With ``columns`` / ``diagonals`` the
    selection is token-level inside its blocks; ``token_level=None`` keeps token granularity unless the partly kept
    blocks exceed TOKEN_LEVEL_MAX_ELEMS elements (their bit tiles cost ~8 bytes per element while being built; past
    that the same blocks run whole, logged). ``gather`` (bool [B, H, Skv]) columns are not turned into blocks: the
    kernels load them by index for every causal query outside the kept blocks (``BlockSparse.with_columns``)."""
    selected = selected & causal_blocks(Sq, Skv, block, selected.device)
    within = masks.causal(offset=Skv - Sq)
    if columns is not None:
        block_cols = columns if gather is None else columns & ~gather
        selected = selected & token_blocks(block_cols, diagonals, Sq, Skv, block)
        partial = selected & ~token_covered_blocks(block_cols, diagonals, Sq, Skv, block)
        elems = int(partial.sum()) * block[0] * block[1]
        if token_level is None:
            token_level = elems <= TOKEN_LEVEL_MAX_ELEMS
            if not token_level:
                log.info("token-level columns/diagonals realised at block granularity (%d selected elements)", elems)
        if token_level:
            within = within & token_mask_mod(columns, diagonals, Skv - Sq)
    bs = BlockSparse.from_block_mask(selected, Sq, Skv, block, within=within)
    return bs if gather is None else bs.with_columns(gather)
