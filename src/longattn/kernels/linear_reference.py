"""Plain PyTorch causal linear attention: the naive recurrence (the oracle, any dtype including fp64) and a chunked
form (the CPU execution path). Semantics shared by every implementation:

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        state [Dk, Dv] per (sequence, head)
    o_t = scale * q_t S_t

with g a log-decay [B, H, S] (<= 0; None means no decay). Packed variable-length batches (B = 1) restart the
state at every ``cu_seqlens`` boundary; states in and out are [N, H, Dk, Dv] with N sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segments(seq: int, batch: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, end token) of every sequence, in state order."""
    if cu_seqlens is None:
        return [(b, 0, seq) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _assemble(outs: list[Tensor], packed: bool, dtype: torch.dtype) -> Tensor:
    """Per-sequence outputs [H, L, Dv] back into [B, H, S, Dv] (stacked) or [1, H, T, Dv] (packed)."""
    return (torch.cat(outs, 1).unsqueeze(0) if packed else torch.stack(outs, 0)).to(dtype)


def _state_dtype(q: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    return state_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float,
                               initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                               state_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence, computed in ``state_dtype`` (fp32, or fp64 for fp64 inputs; pass the inputs'
    own dtype for the low-precision baseline of the oracle rule). Returns (o in q.dtype, final states)."""
    B, H, S, Dk = q.shape
    dt = _state_dtype(q, state_dtype)
    if cu_seqlens is not None:  # each packed sequence on its own, then back into one row
        parts = [linear_attention_recurrent(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                            None if g is None else g[:, :, lo:hi], scale=scale,
                                            initial_state=None if initial_state is None else initial_state[i:i + 1],
                                            state_dtype=dt)
                 for i, (_, lo, hi) in enumerate(_segments(S, B, cu_seqlens))]
        return torch.cat([o for o, _ in parts], 2), torch.cat([s for _, s in parts], 0)
    state = (initial_state.to(dt) if initial_state is not None
             else torch.zeros(B, H, Dk, v.shape[-1], dtype=dt, device=q.device))
    steps = []
    for t in range(S):
        if g is not None:
            state = torch.exp(g[:, :, t].to(dt))[..., None, None] * state
        state = state + k[:, :, t, :, None].to(dt) * v[:, :, t, None, :].to(dt)
        steps.append(scale * (q[:, :, t, :, None].to(dt) * state).sum(-2))
    o = torch.stack(steps, 2) if steps else q.new_zeros(B, H, 0, v.shape[-1])
    return o.to(q.dtype), state


def _chunk_one(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float, state: Tensor,
               chunk: int) -> tuple[Tensor, Tensor]:
    """One sequence [H, L, D]: exact attention inside each chunk, the state carried between chunks."""
    dt = state.dtype
    outs = []
    for lo in range(0, q.shape[1], chunk):
        qc, kc, vc = (x[:, lo:lo + chunk].to(dt) for x in (q, k, v))
        n = qc.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if g is None:
            decay_in, decay_out, total = torch.ones_like(qc[..., 0]), torch.ones_like(qc[..., 0]), None
            pair = causal.to(dt)
        else:
            b = g[:, lo:lo + chunk].to(dt).cumsum(-1)
            total = b[:, -1:]
            decay_in, decay_out = torch.exp(b), torch.exp(total - b)
            pair = torch.exp((b[:, :, None] - b[:, None, :]).masked_fill(~causal, float("-inf")))
        scores = (qc @ kc.transpose(-1, -2)) * pair
        outs.append(scale * (scores @ vc + (qc * decay_in[..., None]) @ state))
        if total is not None:
            state = torch.exp(total)[..., None] * state
        state = state + (kc * decay_out[..., None]).transpose(-1, -2) @ vc
    o = torch.cat(outs, 1) if outs else q.new_zeros(q.shape[0], 0, v.shape[-1])
    return o, state


def linear_attention_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float,
                           initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                           chunk: int = 64, state_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Chunked parallel form (Lightning Attention-2 tiling) in plain PyTorch; differentiable by autograd.
    Returns (o in q.dtype, final states [N, H, Dk, Dv])."""
    B, H, S, Dk = q.shape
    Dv = v.shape[-1]
    dt = _state_dtype(q, state_dtype)
    outs, finals = [], []
    for i, (b, lo, hi) in enumerate(_segments(S, B, cu_seqlens)):
        state = (initial_state[i].to(dt) if initial_state is not None
                 else torch.zeros(H, Dk, Dv, dtype=dt, device=q.device))
        gs = g[b, :, lo:hi] if g is not None else None
        o, state = _chunk_one(q[b, :, lo:hi], k[b, :, lo:hi], v[b, :, lo:hi], gs, scale, state, chunk)
        outs.append(o)
        finals.append(state)
    return _assemble(outs, cu_seqlens is not None, q.dtype), torch.stack(finals, 0)
