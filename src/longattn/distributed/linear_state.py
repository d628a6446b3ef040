"""Context parallelism for linear attention by state passing: every rank runs the chunked kernel on its contiguous
shard from a zero state, the ranks exchange their final states and total log-decays (one all-gather of
[B, H, Dk, Dv] per rank, independent of length), each folds the earlier ranks' states into the state its shard
starts from, and adds that state's contribution, scale · exp(cumsum g)_t · q_t S_0, to its outputs. All shards
compute at once; only the small fold is sequential. Differentiable (one all-reduce of the state gradients)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.distributed.sharding import group_info
from longattn.kernels.linear import _log_g, linear_attention


def _gather(x: Tensor, group) -> Tensor:
    """Every rank's ``x`` stacked in rank order."""
    _, world = group_info(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _fold(states: Tensor, totals: Tensor, rank: int) -> Tensor:
    """The state shard ``rank`` starts from: Σ_j<rank exp(G_{j+1} + ... + G_{rank-1}) S_j."""
    start = torch.zeros_like(states[0])
    for j in range(rank):
        start = torch.exp(totals[j])[..., None, None] * start + states[j]
    return start


class _StartState(torch.autograd.Function):
    """This rank's starting state from every rank's final state and total log-decay (one all-gather each).
    Backward: each rank's gradient for every shard's (state, log-decay), summed by one all-reduce. Every rank
    uses the output (rank 0's is zero), so every rank joins that all-reduce."""

    @staticmethod
    def forward(ctx, local, total, group):
        rank, _ = group_info(group)
        states, totals = _gather(local, group), _gather(total, group)
        ctx.save_for_backward(states, totals)
        ctx.args = (group, rank)
        return _fold(states, totals, rank)

    @staticmethod
    def backward(ctx, d_start):
        states, totals = ctx.saved_tensors
        group, rank = ctx.args
        d_states, d_totals = torch.zeros_like(states), torch.zeros_like(totals)
        if rank:
            with torch.enable_grad():
                s, t = states.detach().requires_grad_(), totals.detach().requires_grad_()
                d_states, d_totals = torch.autograd.grad(_fold(s, t, rank), (s, t), d_start)
        both = torch.cat([d_states.flatten(), d_totals.flatten()])
        dist.all_reduce(both, group=group)
        n = d_states.numel()
        return both[:n].view_as(states)[rank], both[n:].view_as(totals)[rank], None


def linear_attention_cp(q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor | None = None, gate: Tensor | None = None,
                        scale: float | None = None, group=None, impl: str = "auto", chunk_size: int = 64,
                        output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention (as ``longattn.linear_attention``) over a sequence split contiguously across
    ``group``: q/k/v [B, H, n, D] and ``gate`` [B, H, n] are this rank's shards, ``decay`` [H] is shared. Returns
    (this rank's outputs, with ``output_final_state`` the state after this rank's shard: the last rank's is the
    sequence's)."""
    group_info(group)
    B, H, n, Dk = q.shape
    if gate is not None and tuple(gate.shape) != (B, H, n):
        raise ValueError(f"gate: expected this rank's shard of shape {(B, H, n)}, got {tuple(gate.shape)}")
    scale = Dk ** -0.5 if scale is None else float(scale)
    o, local = linear_attention(q, k, v, decay=decay, gate=gate, scale=scale, impl=impl, chunk_size=chunk_size,
                                output_final_state=True)
    g = _log_g(decay, gate, B, n, local.dtype)
    total = g.sum(-1) if g is not None else local.new_zeros(B, H)
    start = _StartState.apply(local, total, group)
    reach = torch.exp(g.cumsum(-1))[..., None] if g is not None else 1.0
    o = o + (scale * reach * (q.to(local.dtype) @ start)).to(o.dtype)
    if not output_final_state:
        return o, None
    return o, torch.exp(total)[..., None, None] * start + local
