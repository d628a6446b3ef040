"""Causal linear attention: ``linear_attention`` (prefill / training, chunked, forward and backward) and
``linear_attention_step`` (decoding a few tokens from a state).

    S_t = a_t · S_{t-1} + k_tᵀ v_t,   o_t = scale · q_t S_t,   a_t = exp(g_t)

with a per-head constant ``decay`` in (0, 1] (RetNet / TransNormer / Lightning) and/or a data-dependent log-space
``gate`` [B, H, S] (≤ 0). Feature maps and normalisers belong to the caller. States are fp32 [N, H, Dk, Dv]
(N = batch, or number of ``cu_seqlens`` sequences), in and out, with gradients through both.
"""

from __future__ import annotations

import logging
import weakref
from itertools import pairwise

import torch
from torch import Tensor

from longattn.kernels import linear_reference as ref

log = logging.getLogger("longattn")
_logged: set[str] = set()
IMPLS = ("auto", "triton", "chunk", "recurrent")
LOWP = (torch.float16, torch.bfloat16, torch.float32)


class _ChunkFn(torch.autograd.Function):
    """The Triton chunked kernels as one differentiable op over (q, k, v, g, initial_state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, plan):
        from longattn.kernels import linear_triton as lt

        o, ht, carry = lt.chunk_fwd(q, k, v, g, h0, scale, plan)
        ctx.save_for_backward(q, k, v, g, h0, ht, carry)
        ctx.scale, ctx.plan = scale, plan
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        from longattn.kernels import linear_triton as lt

        q, k, v, g, h0, ht, carry = ctx.saved_tensors
        plan = ctx.plan
        g_grad = g is not None and ctx.needs_input_grad[3]
        if do is None:
            do = torch.zeros_like(v)
        dq, dk, dv, dgl, dh0 = lt.chunk_bwd(q, k, v, g, h0, carry, ctx.scale, plan, do.contiguous(),
                                            None if dht is None else dht.contiguous(), g_grad)
        dg = _gate_grad(dgl, dht, ht, plan) if g_grad else None
        return dq, dk, dv, dg, (dh0 if h0 is not None else None), None, None


def _gate_grad(dgl: Tensor, dht: Tensor | None, ht: Tensor, plan) -> Tensor:
    """Log-decay gradient: the per-token term plus ⟨dS_T, S_T⟩ at each sequence's last token, summed from the
    end of each sequence back to its start (reverse cumulative sum within sequences)."""
    if dht is not None and plan.last_token.numel():
        final = (dht * ht).sum((-2, -1))[plan.nonempty.to(ht.device)]  # [N', H]
        rows, last = plan.last_rows.to(dgl.device), plan.last_token.to(dgl.device)
        dgl[rows, :, last] += final
    rev = dgl.double().flip(-1).cumsum(-1).flip(-1)  # fp64: long sums of terms that largely cancel
    if plan.n_seq == dgl.shape[0] and plan.nonempty.all():  # one sequence per batch row
        return rev.float()
    rev = torch.cat([rev, rev.new_zeros(*dgl.shape[:-1], 1)], -1)
    starts, lens = plan.starts, plan.lens
    end_of = torch.repeat_interleave(starts + lens, lens, output_size=dgl.shape[-1])
    return (rev[..., :-1] - rev[..., end_of]).float()


def _check(cond: bool, err: type[Exception], msg: str) -> None:
    if not cond:
        raise err(msg)


def _validate(q, k, v, decay, gate, initial_state, cu_seqlens, impl, state_name="initial_state") -> int:
    """Check the public arguments once; returns the number of sequences N."""
    _check(impl in IMPLS, ValueError, f"impl must be one of {IMPLS}, got {impl!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(x, Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _check(x.dim() == 4, ValueError, f"{name} must be [B, H, S, D], got shape {tuple(x.shape)}")
    _check(q.dtype == k.dtype == v.dtype, TypeError,
           f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.dtype in LOWP + (torch.float64,), TypeError,
           f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    _check(q.device == k.device == v.device, ValueError, "q, k, v must be on one device")
    _check(q.shape == k.shape, ValueError, f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    _check(v.shape[:3] == q.shape[:3], ValueError,
           f"v must be [B, H, S, Dv] with [B, H, S] = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    B, H, S, Dk = q.shape
    if decay is not None:
        _check(isinstance(decay, Tensor) and decay.shape == (H,), ValueError,
               f"decay must be a tensor of shape [H] = [{H}], got {getattr(decay, 'shape', type(decay).__name__)}")
        _check_decay_values(decay)
    if gate is not None:
        _check(isinstance(gate, Tensor) and gate.shape == (B, H, S), ValueError,
               f"gate must be a log-decay tensor [B, H, S] = {[B, H, S]}, got "
               f"{getattr(gate, 'shape', type(gate).__name__)}")
        _check(gate.is_floating_point(), TypeError, f"gate must be floating point, got {gate.dtype}")
    n = B
    if cu_seqlens is not None:
        _check(isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2, ValueError,
               "cu_seqlens must be a 1-D tensor [N + 1] of sequence boundaries")
        _check(cu_seqlens.dtype in (torch.int32, torch.int64), TypeError,
               f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        _check(B == 1, ValueError, f"cu_seqlens needs a packed batch (B = 1), got B = {B}")
        cu = cu_seqlens.tolist()
        _check(cu[0] == 0 and cu[-1] == S and all(a <= b for a, b in pairwise(cu)), ValueError,
               f"cu_seqlens must be non-decreasing from 0 to S = {S}, got {cu[:8]}{'...' if len(cu) > 8 else ''}")
        n = len(cu) - 1
    if initial_state is not None:
        want = (n, H, Dk, v.shape[-1])
        _check(isinstance(initial_state, Tensor) and tuple(initial_state.shape) == want, ValueError,
               f"{state_name} must be [N, H, Dk, Dv] = {list(want)}, got "
               f"{tuple(getattr(initial_state, 'shape', ()))}")
    return n


def _state_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


_valid_decays: dict[int, tuple[weakref.ref, int]] = {}  # id -> (the tensor, its version when checked)


def _check_decay_values(decay: Tensor) -> None:
    """decay in (0, 1]. Reading the values back syncs a GPU, so a decay tensor (a layer's fixed buffer, passed at
    every decoding step) is checked once per in-place version, not on every call."""
    seen = _valid_decays.get(id(decay))
    if seen is not None and seen[0]() is decay and seen[1] == decay._version:
        return
    bad = ~((decay > 0) & (decay <= 1))
    _check(not bool(bad.any()), ValueError,
           f"decay values must lie in (0, 1], got {decay[bad][:4].tolist()} among them")
    key = id(decay)
    _valid_decays[key] = (weakref.ref(decay, lambda _, key=key: _valid_decays.pop(key, None)), decay._version)


def _log_g(decay: Tensor | None, gate: Tensor | None, B: int, S: int, dtype: torch.dtype) -> Tensor | None:
    """One log-decay [B, H, S] (fp32; fp64 for fp64 inputs) from the per-head decay and/or the gate."""
    g = None
    if decay is not None:
        g = torch.log(decay.to(dtype))[None, :, None].expand(B, -1, S)
    if gate is not None:
        g = gate.to(dtype) if g is None else g + gate.to(dtype)
    return None if g is None else g.contiguous()


def _choose(q: Tensor, impl: str) -> str:
    if impl == "triton":
        _check(q.device.type == "cuda" or _interpreted(), ValueError,
               f"impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1), got device {q.device}")
        _check(q.dtype in LOWP, ValueError, f"impl='triton' takes float16/bfloat16/float32, got {q.dtype}")
    if impl != "auto":
        return impl
    chosen = "triton" if q.device.type == "cuda" and q.dtype in LOWP else "chunk"
    if chosen not in _logged:
        _logged.add(chosen)
        log.info("longattn.linear_attention impl='auto' chose %r on %s", chosen, q.device)
    return chosen


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor | None = None, gate: Tensor | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: Tensor | None = None, impl: str = "auto",
                     chunk_size: int = 64) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention over [B, H, S, D] inputs (v may have its own Dv); returns (o [B, H, S, Dv],
    final state fp32 [N, H, Dk, Dv] or None). impl: triton (chunked Triton kernels), chunk (PyTorch chunked),
    recurrent (the token-by-token oracle), auto (triton on CUDA, chunk on CPU; logged once)."""
    _validate(q, k, v, decay, gate, initial_state, cu_seqlens, impl)
    _check(chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0, ValueError,
           f"chunk_size must be a power of two >= 16, got {chunk_size}")
    B, H, S, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else float(scale)
    chosen = _choose(q, impl)
    g = _log_g(decay, gate, B, S, _state_dtype(q))
    h0 = None if initial_state is None else initial_state.to(_state_dtype(q))
    if chosen == "triton":
        from longattn.kernels.linear_triton import plan_for

        plan = plan_for(B, S, H, cu_seqlens, chunk_size, q.device)
        o, ht = _ChunkFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), g,
                               None if h0 is None else h0.contiguous(), scale, plan)
    elif chosen == "chunk":
        o, ht = ref.linear_attention_chunk(q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens,
                                           chunk=chunk_size)
    else:
        o, ht = ref.linear_attention_recurrent(q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens)
    return o, (ht if output_final_state else None)


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, *, decay: Tensor | None = None,
                          gate: Tensor | None = None, scale: float | None = None,
                          impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Decode T (usually 1) new tokens [B, H, T, D] from ``state`` [B, H, Dk, Dv]; returns (o, new fp32 state).
    Fused recurrent Triton kernel on CUDA (impl triton/auto), the PyTorch recurrence otherwise (no autograd)."""
    _check(isinstance(state, Tensor), TypeError, f"state must be a tensor [B, H, Dk, Dv], got {type(state).__name__}")
    _validate(q, k, v, decay, gate, state, None, impl, state_name="state")
    B, H, T, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else float(scale)
    chosen = _choose(q, impl)
    g = _log_g(decay, gate, B, T, _state_dtype(q))
    if chosen == "triton":
        from longattn.kernels.linear_triton import recurrent_step

        with torch.no_grad():
            return recurrent_step(q.contiguous(), k.contiguous(), v.contiguous(), g, state.float().contiguous(),
                                  scale)
    return ref.linear_attention_recurrent(q, k, v, g, scale=scale, initial_state=state.to(_state_dtype(q)))


__all__ = ["linear_attention", "linear_attention_step"]
