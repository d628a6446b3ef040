"""Flowformer's Flow-Attention, causal (Wu et al. 2022, "Flowformer: Linearizing Transformers with Conservation
Flows"): linear attention with sigmoid features where each query (sink) and key (source) is normalised by its flow,
sources compete for the output (softmax over time of their conserved outgoing flow) and sinks gate what they receive
(sigmoid of their conserved incoming flow). Every quantity is a running sum, so it is an exact recurrence."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.methods.linear.base import LinearLayer, State, linear_attention_step, linear_attention_torch
from longattn.methods.registry import register


@register("flowformer", "linear", paper="Flowformer (Wu et al. 2022), causal Flow-Attention", impls=("torch",))
class Flowformer(LinearLayer):
    """State per head: sums of phi(k), phi(q), phi(k) * outgoing, phi(q) * incoming [D], of exp(outgoing) [1], the
    kv state [D, Dv], and the token count."""

    eps = 1e-6

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim)
        H, D = n_heads, self.head_dim
        self.qkv = nn.Linear(d_model, 3 * H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.chunk = chunk

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        B, H, D = batch, self.n_heads, self.head_dim
        return {"k_sum": (B, H, D), "q_sum": (B, H, D), "k_out": (B, H, D), "q_in": (B, H, D), "e_sum": (B, H),
                "S": (B, H, D, D), "t": (B,)}

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return torch.sigmoid(q), torch.sigmoid(k), v

    def _flows(self, q: Tensor, k: Tensor, t: Tensor, st: State) -> tuple[Tensor, ...]:
        """Running flows for tokens at positions t [S] (1-based): returns the scaled query, the competition weight,
        the allocation gate and the new sums. Works for one token (S = 1) and for a whole block alike."""
        k_sum = st["k_sum"][:, :, None] + k.cumsum(2)
        q_sum = st["q_sum"][:, :, None] + q.cumsum(2)
        incoming = t / ((q * k_sum).sum(-1) + self.eps)  # [B, H, S]: t / (flow into each sink)
        outgoing = t / ((k * q_sum).sum(-1) + self.eps)
        k_out = st["k_out"][:, :, None] + (k * outgoing[..., None]).cumsum(2)
        q_in = st["q_in"][:, :, None] + (q * incoming[..., None]).cumsum(2)
        sink = (q * k_out).sum(-1) / t  # conserved incoming flow
        source = ((k * q_in).sum(-1) / t).clamp(max=1.0).exp()  # conserved outgoing flow, exponentiated
        e_sum = st["e_sum"][..., None] + source.cumsum(-1)
        compete = source / e_sum * t
        q_scaled = q * (incoming / t)[..., None]
        sums = {"k_sum": k_sum[:, :, -1], "q_sum": q_sum[:, :, -1], "k_out": k_out[:, :, -1],
                "q_in": q_in[:, :, -1], "e_sum": e_sum[..., -1]}
        return q_scaled, compete, torch.sigmoid(sink), sums

    def _out(self, o: Tensor) -> Tensor:
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The parallel core (the kernel's semantics, no decay)."""
        return linear_attention_torch(q, k, v, initial_state=state, chunk=self.chunk)

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = self._features(x)
        t0 = state["t"][0] if state["t"].numel() else x.new_zeros(())
        t = t0 + torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        q_scaled, compete, alloc, sums = self._flows(q, k, t, state)
        o, s = self._mix(q_scaled, k, v * compete[..., None], state["S"])
        return self._out(o * alloc[..., None]), {**sums, "S": s, "t": state["t"] + x.shape[1]}

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = self._features(x_t[:, None])
        t = state["t"][0] + 1
        q_scaled, compete, alloc, sums = self._flows(q, k, t.view(1), state)
        o, s = linear_attention_step(q_scaled[:, :, 0], k[:, :, 0], v[:, :, 0] * compete, state["S"])
        return self._out((o * alloc)[:, :, None])[:, 0], {**sums, "S": s, "t": state["t"] + 1}
