"""MInference's vertical-slash head pattern (Jiang et al., NeurIPS 2024): the last ``last_q`` queries' attention
picks the key columns (vertical lines) and the diagonals (slash lines) that carry the most mass; every query then
attends to those columns and diagonals only."""

from __future__ import annotations

from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register

FORCED_COLUMNS, FORCED_DIAGONALS = 30, 100  # MInference always keeps the first 30 keys and the 100 nearest diagonals


def vertical_slash_tokens(q: Tensor, k: Tensor, last_q: int, vertical_size: int, slash_size: int,
                          forced_columns: int, forced_diagonals: int) -> tuple[Tensor, Tensor]:
    """Kept columns and diagonals, bool [B, Hq, Skv] each, from the last-query attention estimate."""
    vertical, slash = _select.vertical_slash_scores(_select.last_q_attention(q, k, last_q))
    vertical[..., :forced_columns] = float("inf")  # the first tokens (sinks) are always kept
    slash[..., :forced_diagonals] = float("inf")  # and so are the nearest diagonals (local window)
    return _select.topk_mask(vertical, vertical_size), _select.topk_mask(slash, slash_size)


@register("minference_vertical_slash", "prefill", paper="MInference 1.0 (Jiang et al. 2024), vertical-slash pattern")
class MInferenceVerticalSlash(PrefillMethod):
    """Top ``vertical_size`` columns and top ``slash_size`` diagonals per head, estimated from the last 64 queries.
    Defaults from MInference's released config: last_q=64, vertical_size=1000, slash_size=6096, with the first 30
    columns and the 100 nearest diagonals always kept. The vertical columns are gathered by index (as MInference's
    kernel does: work proportional to the columns, not to the blocks they are scattered over); the slash lines become
    the 64-token blocks they cross, token-level inside; when those partly kept blocks exceed
    _select.TOKEN_LEVEL_MAX_ELEMS elements (long contexts) and ``token_level`` is None, the same blocks run whole
    instead (a superset of the token pattern, logged; token_level=True forces bit tiles, False whole blocks).
    Triton runs it forward only (prefill). A last_q window longer than
    the prompt uses the whole prompt; budgets larger than the context raise."""

    def __init__(self, vertical_size: int = 1000, slash_size: int = 6096, last_q: int = 64, block: int = 64,
                 forced_columns: int = FORCED_COLUMNS, forced_diagonals: int = FORCED_DIAGONALS,
                 token_level: bool | None = None):
        self.vertical_size = _select.check_int("vertical_size", vertical_size)
        self.slash_size = _select.check_int("slash_size", slash_size)
        self.last_q = _select.check_int("last_q", last_q)
        self.forced_columns = _select.check_int("forced_columns", forced_columns, low=0)
        self.forced_diagonals = _select.check_int("forced_diagonals", forced_diagonals, low=0)
        b = _select.check_block("block", block)
        self.block, self.token_level = (b, b), token_level

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        Sq, Skv = q.shape[2], k.shape[2]
        _select.check_budget("vertical_size", self.vertical_size, Skv)
        _select.check_budget("slash_size", self.slash_size, Skv)
        cols, diags = vertical_slash_tokens(q, k, self.last_q, self.vertical_size, self.slash_size,
                                            self.forced_columns, self.forced_diagonals)
        every = cols.new_ones(*cols.shape[:2], *_select.causal_blocks(Sq, Skv, self.block, q.device).shape)
        self.last_blocks = _select.build(every, Sq, Skv, self.block, columns=cols, diagonals=diags,
                                         token_level=self.token_level, gather=cols)
        return self.last_blocks
