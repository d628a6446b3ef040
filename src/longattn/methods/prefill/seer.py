"""SeerAttention-style block gating without training (after Gao et al. 2024, "SeerAttention: Learning Intrinsic
Sparse Attention in Your LLMs"): pool queries (mean) and keys (max, min, mean) per 64-token block, turn them into a
softmax gate over key blocks, and keep the blocks whose gate exceeds a threshold (or the top-k)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, _mean_pool
from longattn.methods.registry import register


def pooled_keys(k: Tensor, block: int) -> Tensor:
    """Seer's key pooling per block over valid tokens: concat(max, min, mean) -> [B, H, nKB, 3 D] (float32)."""
    B, H, S, D = k.shape
    n = math.ceil(S / block)
    pad = n * block - S
    kf = k.float()
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(B, H, n, block, D).amax(3)
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(B, H, n, block, D).amin(3)
    return torch.cat([hi, lo, _mean_pool(kf, block)], -1)


def causal_log_softmax(scores: Tensor, Sq: int, Skv: int, block: tuple[int, int]) -> Tensor:
    """log_softmax over key blocks [.., nQB, nKB] with causally unreachable blocks at -inf."""
    reach = _select.causal_blocks(Sq, Skv, block, scores.device)
    return torch.log_softmax(scores.masked_fill(~reach, float("-inf")), dim=-1)


def gate_select(gate: Tensor, threshold: float, top_k: int | None, Sq: int, Skv: int,
                block: tuple[int, int]) -> Tensor:
    """Blocks kept from gate probabilities [B, H, nQB, nKB]: top_k per row when given, else gate >= threshold;
    plus the diagonal block of every row."""
    keep = _select.topk_mask(gate, top_k) if top_k is not None else gate >= threshold
    return keep | _select.diagonal_blocks(Sq, Skv, block, gate.device)


def check_gate_knobs(threshold: float, top_k: int | None) -> tuple[float, int | None]:
    """threshold in [0, 1); top_k a positive int or None."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise ValueError(f"threshold: expected a gate probability in [0, 1), got {threshold!r}")
    if top_k is not None:
        _select.check_int("top_k", top_k)
    return float(threshold), top_k


@register("seer", "prefill", paper="SeerAttention (Gao et al. 2024), training-free pooled gate")
class SeerAttention(PrefillMethod):
    """Training-free gate: a block's logit is the largest pooled-query · key product its keys' per-dimension
    max / min pooling allows (the bound sum_d max(q_d kmax_d, q_d kmin_d), as Quest bounds a page), softmaxed over
    causal key blocks. Defaults from SeerAttention: 64-token blocks, threshold 5e-4 (its release suggests 5e-4 to
    5e-3; higher is sparser); top_k (key blocks per query block) replaces the threshold when given and may not
    exceed the key blocks. threshold=0 keeps every causal block."""

    def __init__(self, threshold: float = 5e-4, top_k: int | None = None, block: int = 64):
        self.threshold, self.top_k = check_gate_knobs(threshold, top_k)
        b = _select.check_block("block", block)
        self.block = (b, b)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        H, Sq, D = q.shape[1], q.shape[2], q.shape[3]
        Skv = k.shape[2]
        n_kv = math.ceil(Skv / self.block[1])
        if self.top_k is not None:
            _select.check_budget("top_k", self.top_k, n_kv, unit="kv blocks")
        qp = _mean_pool(q.float(), self.block[0])
        kx = pooled_keys(_select.repeat_kv(k, H), self.block[1])
        kmax, kmin = kx[..., :D], kx[..., D:2 * D]
        # sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin: two matmuls, no [nQB, nKB, D] tensor
        bound = (qp.clamp(min=0) @ kmax.transpose(-1, -2) + qp.clamp(max=0) @ kmin.transpose(-1, -2)) / math.sqrt(D)
        gate = causal_log_softmax(bound, Sq, Skv, self.block).exp()
        selected = gate_select(gate, self.threshold, self.top_k, Sq, Skv, self.block)
        self.last_blocks = _select.build(selected, Sq, Skv, self.block)
        return self.last_blocks
