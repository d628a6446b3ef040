"""Aaren (Feng et al. 2024, "Attention as an RNN"): softmax attention of a learned query over all past tokens,
computed as a many-to-many RNN; the parallel form is a prefix scan with the associative (max, numerator,
denominator) operator, the recurrent form folds one token at a time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.methods.linear.base import LinearLayer, State
from longattn.methods.registry import register


def combine(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two softmax partial sums (running max m, numerator u, denominator w); a comes before b."""
    (ma, ua, wa), (mb, ub, wb) = a, b
    m = torch.maximum(ma, mb)
    ea, eb = (ma - m).exp(), (mb - m).exp()
    return m, ua * ea[..., None] + ub * eb[..., None], wa * ea + wb * eb


def prefix_scan(m: Tensor, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive Hillis-Steele scan of ``combine`` along dim 2 (m, w [B, H, S]; u [B, H, S, D]): log2(S) steps."""
    d, S = 1, m.shape[2]
    while d < S:
        head = (m[:, :, :d], u[:, :, :d], w[:, :, :d])
        tail = combine((m[:, :, :-d], u[:, :, :-d], w[:, :, :-d]), (m[:, :, d:], u[:, :, d:], w[:, :, d:]))
        m, u, w = (torch.cat([h, t], 2) for h, t in zip(head, tail, strict=True))
        d *= 2
    return m, u, w


@register("aaren", "linear", paper="Attention as an RNN (Feng et al. 2024)", impls=("torch",))
class Aaren(LinearLayer):
    """o_t = sum_{i<=t} softmax_i(q_h . k_i / sqrt(D)) v_i with a learned per-head query q_h (not input-dependent);
    state per head: running max m, numerator u [D], denominator w."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None):
        super().__init__(d_model, n_heads, head_dim)
        H, D = n_heads, self.head_dim
        self.query = nn.Parameter(torch.randn(H, D) * D ** -0.5)
        self.kv = nn.Linear(d_model, 2 * H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"m": (batch, self.n_heads), "u": (batch, self.n_heads, self.head_dim), "w": (batch, self.n_heads)}

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> State:
        state = super().init_state(batch, dtype, device)
        state["m"].fill_(float("-inf"))  # the empty sum: no max yet
        return state

    def _scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, S, d] -> scores s [B, H, S], values v [B, H, S, D]."""
        B, S, _ = x.shape
        k, v = self.kv(x).view(B, S, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return torch.einsum("bhsd,hd->bhs", k, self.query.to(x.dtype)) * self.head_dim ** -0.5, v

    def _out(self, u: Tensor, w: Tensor) -> Tensor:
        o = u / w[..., None]
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        s, v = self._scores(x)
        m = torch.cat([state["m"][:, :, None], s], 2)  # the carried state is the scan's first element
        u = torch.cat([state["u"][:, :, None], v], 2)
        w = torch.cat([state["w"][:, :, None], torch.ones_like(s)], 2)
        m, u, w = prefix_scan(m, u, w)
        return self._out(u[:, :, 1:], w[:, :, 1:]), {"m": m[:, :, -1], "u": u[:, :, -1], "w": w[:, :, -1]}

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        s, v = self._scores(x_t[:, None])
        m, u, w = combine((state["m"], state["u"], state["w"]), (s[:, :, 0], v[:, :, 0], torch.ones_like(s[:, :, 0])))
        return self._out(u[:, :, None], w[:, :, None])[:, 0], {"m": m, "u": u, "w": w}
