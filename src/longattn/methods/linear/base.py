"""Linear / recurrent token mixers: one base class with a parallel form (``forward``) and a recurrent form
(``step``), plus the PyTorch decayed linear-attention core that every kernel-shaped layer shares.

The core follows the semantics of ``longattn.kernels.linear.linear_attention``: S_t = a_t S_{t-1} + k_t^T v_t,
o_t = scale * q_t S_t, with a_t = decay[h] * exp(gate[b, h, t]). Layers call it from ONE method (``_mix``), so the
parallel path can be routed through the Triton kernel by changing one line."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = dict[str, Tensor]


def check_decay(decay: Tensor, heads: int) -> None:
    """Decay must be one factor per head in (0, 1]."""
    if decay.shape != (heads,):
        raise ValueError(f"decay: expected shape ({heads},) (one factor per head), got {tuple(decay.shape)}")
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"decay: expected every value in (0, 1], got min {float(decay.min()):.4g} "
                         f"max {float(decay.max()):.4g}")


def linear_attention_torch(q: Tensor, k: Tensor, v: Tensor, *, decay: Tensor | None = None,
                           gate: Tensor | None = None, scale: float = 1.0, initial_state: Tensor | None = None,
                           output_final_state: bool = True, chunk: int = 64) -> tuple[Tensor, Tensor | None]:
    """Chunked parallel form of the decayed linear recurrence (quadratic inside a chunk, recurrent across chunks).

    q, k [B, H, S, Dk]; v [B, H, S, Dv]; decay [H] in (0, 1]; gate [B, H, S] log-space (<= 0);
    initial_state [B, H, Dk, Dv]. Returns (o [B, H, S, Dv], final state or None)."""
    B, H, S, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"k, v: expected k {tuple(q.shape)} and v (B, H, S, Dv) matching q, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial_state: expected shape {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
    acc = torch.promote_types(q.dtype, torch.float32)  # decays are accumulated in fp32 at least
    log_a = q.new_zeros(B, H, S, dtype=acc)
    if decay is not None:
        check_decay(decay, H)
        log_a = log_a + decay.to(acc).log().view(1, H, 1)
    if gate is not None:
        if gate.shape != (B, H, S):
            raise ValueError(f"gate: expected shape {(B, H, S)} (log-space), got {tuple(gate.shape)}")
        log_a = log_a + gate.to(acc)
    C = chunk
    N = max(1, math.ceil(S / C))
    pad = N * C - S
    if pad:  # zero keys/values and unit decay leave the state unchanged
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_a = F.pad(log_a, (0, pad))
    q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
    b = log_a.reshape(B, H, N, C).cumsum(-1)  # log of the decay from the chunk start to each position
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    w = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp().to(q.dtype)
    o = ((q @ k.transpose(-1, -2)) * w * scale) @ v
    q_in = q * (b.exp() * scale)[..., None].to(q.dtype)
    kv = (k * (b[..., -1:] - b).exp()[..., None].to(q.dtype)).transpose(-1, -2) @ v  # each chunk's part at its end
    last = b[..., -1].exp()[..., None, None].to(q.dtype)
    state = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(B, H, Dk, Dv)
    inter = []
    for n in range(N):
        inter.append(q_in[:, :, n] @ state)
        state = last[:, :, n] * state + kv[:, :, n]
    o = (o + torch.stack(inter, 2)).reshape(B, H, N * C, Dv)[:, :, :S]
    return o, (state if output_final_state else None)


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor, log_a: Tensor | None = None,
                          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: q, k [B, H, Dk], v [B, H, Dv], state [B, H, Dk, Dv], log_a [B, H] or None."""
    if log_a is not None:
        state = log_a.exp()[..., None, None] * state
    state = state + k[..., :, None] * v[..., None, :]
    return scale * (q[..., None, :] @ state).squeeze(-2), state


class LinearLayer(nn.Module, ABC):
    """Token mixer on [B, S, d_model]: ``forward`` is the parallel form, ``step`` the recurrent one; both carry the
    same state dict, so a prompt can be prefilled in parallel and continued token by token (or in more chunks)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads: expected a positive int, got {n_heads!r}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads: d_model ({d_model}) must be divisible by n_heads ({n_heads}) when "
                                 "head_dim is not given")
            head_dim = d_model // n_heads
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim

    @abstractmethod
    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of the recurrent state for a batch of ``batch`` sequences."""

    @abstractmethod
    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Parallel form on validated inputs."""

    @abstractmethod
    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """Recurrent form on validated inputs: x_t [B, d_model]."""

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> State:
        """The empty state (no tokens seen)."""
        return {n: torch.zeros(s, dtype=dtype, device=device) for n, s in self.state_shapes(batch).items()}

    def state_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the recurrent state: what a decoder must keep per layer, independent of sequence length."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) * size for s in self.state_shapes(batch).values())

    def check_state(self, state: State, batch: int) -> None:
        """State must have exactly the expected tensors and shapes."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of tensors (from forward/step/init_state), got {type(state)}")
        want = self.state_shapes(batch)
        if set(state) != set(want):
            raise ValueError(f"state: expected keys {sorted(want)}, got {sorted(state)}")
        for n, s in want.items():
            if tuple(state[n].shape) != s:
                raise ValueError(f"state[{n!r}]: expected shape {s} for batch {batch}, got {tuple(state[n].shape)}")

    def _check_x(self, x: Tensor, dims: int, what: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != dims or x.shape[-1] != self.d_model:
            shape = "[B, S, d_model]" if dims == 3 else "[B, d_model]"
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x)
            raise ValueError(f"{what}: expected {shape} with d_model={self.d_model}, got {got}")

    def forward(self, x: Tensor, state: State | None = None, return_state: bool = False):
        """Parallel form on x [B, S, d_model]; resumes from ``state`` and returns (y, state) if asked."""
        self._check_x(x, 3, "x")
        if state is None:
            state = self.init_state(x.shape[0], x.dtype, x.device)
        else:
            self.check_state(state, x.shape[0])
        y, new = self._forward(x, state)
        return (y, new) if return_state else y

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Recurrent form: one token x_t [B, d_model] -> (y_t [B, d_model], new state)."""
        self._check_x(x_t, 2, "x_t")
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.dtype, x_t.device)
        else:
            self.check_state(state, x_t.shape[0])
        return self._step(x_t, state)


def elu_plus_one(x: Tensor) -> Tensor:
    """Katharopoulos et al.'s positive feature map."""
    return F.elu(x) + 1


class FeatureMapAttention(LinearLayer):
    """Linear attention phi(q) phi(k)^T v with optional per-head decay, optional normaliser (a ones column appended
    to v, so the state also carries sum phi(k)) and optional per-head output RMSNorm and SiLU output gate.

    Subclasses choose ``feature_map`` (per-head [B, H, S, Dk] -> [B, H, S, feature_dim]) and the knobs."""

    eps = 1e-6

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, qk_dim: int | None = None,
                 feature_dim: int | None = None, decay: Tensor | list[float] | None = None, normalize: bool = True,
                 output_norm: bool = False, output_gate: bool = False, scale: float = 1.0, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim)
        self.qk_dim = qk_dim or self.head_dim
        self.feature_dim = feature_dim or self.qk_dim
        H, D = n_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(d_model, H * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(d_model, H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, H * D, bias=False) if output_gate else None
        self.norm = nn.RMSNorm(D, eps=1e-5) if output_norm else None
        if decay is not None:
            decay = torch.as_tensor(decay, dtype=torch.float64)
            check_decay(decay, H)
            self.register_buffer("decay", decay.float(), persistent=False)
        else:
            self.decay = None
        self.normalize, self.scale, self.chunk = normalize, scale, chunk

    def feature_map(self, x: Tensor) -> Tensor:
        """Identity by default."""
        return x

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"S": (batch, self.n_heads, self.feature_dim, self.head_dim + int(self.normalize))}

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections and features: x [B, S, d] -> phi(q), phi(k) [B, H, S, F], v [B, H, S, D] (+ ones column)."""
        B, S, _ = x.shape
        q, k = (p(x).view(B, S, self.n_heads, self.qk_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj))
        v = self.v_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = self.feature_map(q), self.feature_map(k)
        if q.shape[-1] != self.feature_dim or k.shape[-1] != self.feature_dim:
            raise ValueError(f"feature_map: expected features of size feature_dim={self.feature_dim} for q and k, "
                             f"got {q.shape[-1]} and {k.shape[-1]}")
        if self.normalize:
            v = torch.cat([v, v.new_ones(B, self.n_heads, S, 1)], -1)
        return q, k, v

    def _gate(self, x: Tensor) -> Tensor | None:
        """Data-dependent log decay [B, H, S] (None: only the fixed decay)."""
        return None

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
        """The parallel core (route through ``longattn.kernels.linear.linear_attention`` here)."""
        return linear_attention_torch(q, k, v, decay=self.decay, gate=gate, scale=self.scale, initial_state=state,
                                      chunk=self.chunk)

    def _mix_step(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrent core: one token, q, k [B, H, F], v [B, H, Dv], gate [B, H] or None."""
        log_a = None
        if self.decay is not None:
            log_a = self.decay.to(q.dtype).log().expand(q.shape[0], -1)
        if gate is not None:
            log_a = gate if log_a is None else log_a + gate
        return linear_attention_step(q, k, v, state, log_a, self.scale)

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o [B, H, S, Dv(+1)] -> y [B, S, d_model]: normaliser, output norm, gate, projection."""
        if self.normalize:
            o = o[..., :-1] / (o[..., -1:] + self.eps)
        if self.norm is not None:
            o = self.norm(o)
        B, H, S, D = o.shape
        o = o.transpose(1, 2).reshape(B, S, H * D)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = self._heads(x)
        o, s = self._mix(q, k, v, self._gate(x), state["S"])
        return self._output(o, x), {"S": s}

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        x = x_t[:, None]
        q, k, v = self._heads(x)
        gate = self._gate(x)
        o, s = self._mix_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], None if gate is None else gate[..., 0], state["S"])
        return self._output(o[:, :, None], x)[:, 0], {"S": s}
