"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff"):
linear attention with a 2nd-order Taylor feature map of exp(q.k), plus a small sliding-window softmax branch."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.methods.linear.base import FeatureMapAttention, State
from longattn.methods.linear.window import WindowAttention
from longattn.methods.registry import register


def taylor_features(x: Tensor) -> Tensor:
    """phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))], so phi(q).phi(k) = 1 + s + s^2 / 2 with
    s = q.k / sqrt(d): the 2nd-order Taylor expansion of exp(s). Size 1 + d + d^2."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2 ** 0.5 * d ** 0.5)
    return torch.cat([x.new_ones(*x.shape[:-1], 1), x / d ** 0.25, outer], -1)


@register("based", "linear", paper="Based (Arora et al. 2024)", impls=("torch",))
class Based(FeatureMapAttention):
    """Taylor linear attention over ``feature_dim``-sized projections of q and k (state D_f = 1 + f + f^2 per
    head), summed with sliding-window softmax attention over ``window`` tokens (window=0: linear branch only)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, feature_dim: int = 16,
                 window: int = 64, window_heads: int | None = None, chunk: int = 64):
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim: expected a positive int (Taylor map input size), got {feature_dim!r}")
        super().__init__(d_model, n_heads, head_dim, qk_dim=feature_dim, feature_dim=1 + feature_dim + feature_dim ** 2,
                         normalize=True, chunk=chunk)
        self.window = WindowAttention(d_model, window_heads or n_heads, window=window) if window else None

    def feature_map(self, x: Tensor) -> Tensor:
        return taylor_features(x)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        shapes = super().state_shapes(batch)
        if self.window is not None:
            shapes.update({f"win_{n}": s for n, s in self.window.state_shapes(batch).items()})
        return shapes

    def _split(self, state: State) -> tuple[State, State]:
        return {"S": state["S"]}, {n[4:]: t for n, t in state.items() if n.startswith("win_")}

    def _join(self, lin: State, win: State) -> State:
        return {**lin, **{f"win_{n}": t for n, t in win.items()}}

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        lin, win = self._split(state)
        y, lin = super()._forward(x, lin)
        if self.window is not None:
            yw, win = self.window._forward(x, win)
            y = y + yw
        return y, self._join(lin, win)

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        lin, win = self._split(state)
        y, lin = super()._step(x_t, lin)
        if self.window is not None:
            yw, win = self.window._step(x_t, win)
            y = y + yw
        return y, self._join(lin, win)
