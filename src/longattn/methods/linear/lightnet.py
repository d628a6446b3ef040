"""LightNet-style additive recurrence (Qin et al. 2024, "You Only Scan Once"): the state is a softmax-over-time
weighted sum of k^T v, S_t = sum_{i<=t} exp(z_i - Z_t) k_i^T v_i with Z_t = logcumsumexp(z)_t, i.e. a linear
recurrence with data-dependent gate a_t = exp(Z_{t-1} - Z_t) and keys scaled by exp(z_t - Z_t); per-head RMSNorm on
the output. Here z is one score per head and token (LightNet uses one per key dimension), which keeps the gate in the
kernel's [B, H, S] log-space form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.methods.linear.base import FeatureMapAttention, State, linear_attention_step
from longattn.methods.registry import register


def first_gate_open(prev: Tensor, new: Tensor) -> Tensor:
    """log a_t = Z_{t-1} - Z_t, except after an empty state (Z = -inf): there the gate multiplies zeros, so it is
    set to log 1 instead of -inf (which would poison the chunked form's cumulative sums)."""
    return torch.where(torch.isinf(prev), torch.zeros_like(new), prev - new)


@register("lightnet", "linear", paper="You Only Scan Once: LightNet (Qin et al. 2024)", impls=("torch",))
class LightNet(FeatureMapAttention):
    """Gated linear attention with the log-cumsum-exp gate; state: S [B, H, D, D] and the running log-sum-exp."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim, normalize=False, output_norm=True, output_gate=True,
                         chunk=chunk)
        self.z_proj = nn.Linear(d_model, n_heads)

    def feature_map(self, x: Tensor) -> Tensor:
        return F.silu(x)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {**super().state_shapes(batch), "lse": (batch, self.n_heads)}

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> State:
        state = super().init_state(batch, dtype, device)
        state["lse"].fill_(float("-inf"))  # no token seen
        return state

    def _gates(self, x: Tensor, lse0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, d] -> (log gate [B, H, S], key scale [B, H, S], final log-sum-exp [B, H])."""
        acc = torch.promote_types(x.dtype, torch.float32)  # scores and gates in fp32 at least
        z = self.z_proj(x).transpose(1, 2).to(acc)
        Z = torch.logcumsumexp(torch.cat([lse0[..., None].to(acc), z], -1), -1)
        log_gate = first_gate_open(Z[..., :-1], Z[..., 1:])
        return log_gate, (z - Z[..., 1:]).exp().to(x.dtype), Z[..., -1].to(x.dtype)

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = self._heads(x)
        log_gate, k_scale, lse = self._gates(x, state["lse"])
        o, s = self._mix(q, k * k_scale[..., None], v, log_gate, state["S"])
        return self._output(o, x), {"S": s, "lse": lse}

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        x = x_t[:, None]
        q, k, v = self._heads(x)
        acc = torch.promote_types(x_t.dtype, torch.float32)
        z, prev = self.z_proj(x_t).to(acc), state["lse"].to(acc)
        lse = torch.logaddexp(prev, z)
        log_gate = first_gate_open(prev, lse).to(x_t.dtype)
        k = k[:, :, 0] * (z - lse).exp().to(x_t.dtype)[..., None]
        lse = lse.to(x_t.dtype)
        o, s = linear_attention_step(q[:, :, 0], k, v[:, :, 0], state["S"], log_gate, self.scale)
        return self._output(o[:, :, None], x)[:, 0], {"S": s, "lse": lse}
