"""Ring attention (Liu et al., 2023): each rank keeps its query shard while the K/V shards travel around the ring
of ranks; every step attends the local queries to the visiting shard and merges the partial result by its
log-sum-exp, and the next shard's transfer overlaps that step's compute (``batch_isend_irecv``).

Under a causal mask the zigzag layout (``sharding.py``) balances the work: at every step but the first each rank
computes exactly half a shard-by-shard block (all its queries against the first half of a lower rank's keys, or
its second half of queries against all keys of a higher rank). Any other mask_mod (sliding window, documents of a
packed batch, ...) runs per pair of chunks: the mask's block bounds skip pairs it leaves empty (a window shorter
than a shard never sends work to far ranks' keys), run full pairs unmasked and the rest with the mask shifted to
the pair's global positions.

Backward sends the K/V shards around again with their gradient accumulators, which reach their owners one hop
after the last step. On the Triton kernel a partial's gradients come straight from the kernel's backward given the
*merged* output and LSE (P = exp(s − lse) is then already the global probability, and delta = rowsum(dO ∘ out) −
dLSE the global correction), so nothing is recomputed. Other backends recompute the partial through their own
autograd and feed it the gradient of the merge: d out_j = w_j dO and d lse_j = w_j (rowsum(dO ∘ (out_j − out)) +
dLSE), with w_j = exp(lse_j − lse)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.api import _choose, _to_block_sparse, attention
from longattn.distributed.sharding import (
    as_global_mask,
    check_impl,
    check_layout,
    check_qkv,
    chunk_ids,
    group_info,
    peer,
)
from longattn.masks.core import MaskMod
from longattn.masks.patterns import causal as causal_mask

ALL = slice(None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal: bool = False, scale: float | None = None,
                   group=None, layout: str = "zigzag", impl: str = "auto", return_lse: bool = False):
    """Exact attention over a sequence sharded across ``group``: q/k/v are this rank's (batch, heads, seq_local,
    head_dim) shards in ``layout`` order (``longattn.distributed.shard``); returns this rank's output shard (and its
    LSE with ``return_lse``: float32, float64 for float64 inputs). ``mask``: None or a mask_mod over global
    positions (combined with ``causal``). Differentiable; GQA when q heads are a multiple of kv heads."""
    check_qkv(q, k, v)
    check_layout(layout)
    check_impl(impl)
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"q: the zigzag layout holds two equal chunks per rank; local length {q.shape[2]} is odd")
    group_info(group)
    mask = as_global_mask(mask, "ring_attention")
    if mask is not None and causal:
        mask = mask & causal_mask()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(q, k, v, causal, mask, scale, group, layout, impl)
    return (out, lse) if return_lse else out


def _plan(src: int, rank: int, world: int, q: Tensor, causal: bool, mask: MaskMod | None,
          layout: str) -> list[tuple[slice, slice, bool, MaskMod | None]]:
    """(query rows, key rows, causal, mask) of every partial attention against the shard of ``src``."""
    n = q.shape[2]
    if mask is None:
        return [(rows, cols, c, None) for rows, cols, c in _pieces(src, rank, n, causal, layout)]
    mine, theirs = chunk_ids(world, layout)[rank], chunk_ids(world, layout)[src]
    size = n // len(mine)
    b = torch.arange(q.shape[0], device=q.device)[:, None]
    h = torch.arange(q.shape[1], device=q.device)[None, :]
    plan = []
    for i, qc in enumerate(mine):
        for j, kc in enumerate(theirs):
            q_lo, kv_lo = (torch.tensor(c * size, device=q.device) for c in (qc, kc))
            any_, all_ = mask.block_bounds(b, h, q_lo, q_lo + size - 1, kv_lo, kv_lo + size - 1)
            if bool(any_.any()):
                piece = None if bool(all_.all()) else mask.shifted(qc * size, kc * size)
                plan.append((slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size), False, piece))
    return plan


def _pieces(src: int, rank: int, n: int, causal: bool, layout: str) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal) this rank computes against the shard of ``src``: a causal diagonal at its own
    shard, nothing, the whole block, or the half-block the zigzag layout leaves."""
    if not causal:
        return [(ALL, ALL, False)]
    if src == rank:
        return [(ALL, ALL, True)]
    if layout == "contiguous":
        return [(ALL, ALL, False)] if src < rank else []
    half = n // 2
    return [(ALL, slice(0, half), False)] if src < rank else [(slice(half, n), ALL, False)]


def _exchange(send: Tensor, group, rank: int, world: int) -> tuple[Tensor, list]:
    """Start sending ``send`` to the next rank and receiving the previous rank's into a new buffer."""
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, peer(group, (rank + 1) % world), group),
           dist.P2POp(dist.irecv, recv, peer(group, (rank - 1) % world), group)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for r in requests:
        r.wait()


def _merge_into(out: Tensor, lse: Tensor, rows: slice, o_part: Tensor, l_part: Tensor) -> None:
    """Fold a partial (out, lse) for ``rows`` into the running result (float32, or float64 for float64 inputs)."""
    cur_o, cur_l = out[:, :, rows], lse[:, :, rows]
    new = torch.logaddexp(cur_l, l_part)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    keep, take = torch.exp(cur_l - safe)[..., None], torch.exp(l_part - safe)[..., None]
    out[:, :, rows] = cur_o * keep + o_part.to(out.dtype) * take
    lse[:, :, rows] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, mask, scale, group, layout, impl):
        rank, world = group_info(group)
        B, H, n, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
        out = torch.zeros(B, H, n, D, dtype=acc, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        plans = [_plan((rank - step) % world, rank, world, q, causal, mask, layout) for step in range(world)]
        for step, plan in enumerate(plans):
            pending = []
            if step < world - 1:
                incoming, pending = _exchange(kv, group, rank, world)
            for rows, cols, c, m in plan:
                o_part, l_part = attention(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], mask=m, causal=c,
                                           scale=scale, impl=impl, return_lse=True)
                _merge_into(out, lse, rows, o_part, l_part)
            if pending:
                _wait(pending)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plans, scale, group, impl)  # the same pieces (and mask objects, so cached block maps) backward
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plans, scale, group, impl = ctx.args
        rank, world = group_info(group)
        acc = lse.dtype
        dq = torch.zeros_like(q, dtype=acc)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv, dtype=acc)
        for step, plan in enumerate(plans):
            pending = []
            if step < world - 1:
                incoming, pending = _exchange(kv, group, rank, world)
            for rows, cols, c, m in plan:
                dq_p, dk_p, dv_p = _piece_grads(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], c, m, scale,
                                                impl, out[:, :, rows], lse[:, :, rows], d_out[:, :, rows],
                                                None if d_lse is None else d_lse[:, :, rows])
                dq[:, :, rows] += dq_p
                dkv[0][:, :, cols] += dk_p
                dkv[1][:, :, cols] += dv_p
            if world > 1:  # the accumulator follows its shard; after the last step it reaches the owner
                dkv_next, sent = _exchange(dkv, group, rank, world)
                _wait(pending + sent)
                dkv = dkv_next
            if pending:
                kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def _piece_grads(q, k, v, causal, mask, scale, impl, out, lse, d_out, d_lse):
    """Gradients of one partial attention given the gradient that reaches it through the LSE merge."""
    if _choose(q, mask, impl, True, None, None) == "triton":
        from longattn.kernels.block_sparse import block_sparse_backward

        bs = _to_block_sparse(mask, causal, q, k, (128, 128), None, None)
        dq, dk, dv, _, _ = block_sparse_backward(d_out, q, k, v, out, lse, d_lse, bs, scale)
        return dq.to(lse.dtype), dk.to(lse.dtype), dv.to(lse.dtype)
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o_part, l_part = attention(q, k, v, mask=mask, causal=causal, scale=scale, impl=impl, return_lse=True)
        weight = torch.where(torch.isinf(lse), torch.zeros_like(lse), torch.exp(l_part.detach() - lse))
        acc = lse.dtype
        g_out = weight[..., None] * d_out.to(acc)
        g_lse = weight * (d_out.to(acc) * (o_part.detach().to(acc) - out.to(acc))).sum(-1)
        if d_lse is not None:
            g_lse = g_lse + weight * d_lse
        pairs = [(t, g) for t, g in ((o_part, g_out), (l_part, g_lse)) if t.requires_grad]
        torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
    return q.grad.to(acc), k.grad.to(acc), v.grad.to(acc)
