"""Titans-style neural memory (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time"): a per-head
2-layer MLP whose weights are the recurrent state, updated at test time by gradient descent with momentum and
forgetting on the associative loss 1/2 ||M(k_t) - v_t||^2, with gradients taken at the chunk's starting weights
(Titans' chunked parallelisation; chunk=1 is the exact token-by-token online update)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.methods.linear.base import LinearLayer, State
from longattn.methods.registry import register


def memory_grads(w1: Tensor, w2: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token gradients of 1/2 ||w2 silu(w1 k) - v||^2: w1 [B, H, E, D], w2 [B, H, D, E], k, v [B, H, T, D]
    -> (dw1 [B, H, T, E, D], dw2 [B, H, T, D, E])."""
    h = torch.einsum("bhed,bhtd->bhte", w1, k)
    sig = torch.sigmoid(h)
    a = h * sig
    err = torch.einsum("bhde,bhte->bhtd", w2, a) - v
    dh = torch.einsum("bhde,bhtd->bhte", w2, err) * sig * (1 + h * (1 - sig))
    return dh[..., :, None] * k[..., None, :], err[..., :, None] * a[..., None, :]


def memory_read(w1: Tensor, w2: Tensor, q: Tensor) -> Tensor:
    """Per-token retrieval w2_t silu(w1_t q_t): w1 [B, H, T, E, D], w2 [B, H, T, D, E], q [B, H, T, D]."""
    return torch.einsum("bhtde,bhte->bhtd", w2, F.silu(torch.einsum("bhted,bhtd->bhte", w1, q)))


@register("titans", "linear", paper="Titans: Learning to Memorize at Test Time (Behrouz et al. 2024)",
          impls=("torch",))
class TitansMemory(LinearLayer):
    """S_t = eta S_{t-1} - theta grad_t, W_t = (1 - alpha) W_{t-1} + S_t, y_t = M_{W_t}(q_t), per head, with
    grad_t taken at the weights at the start of t's chunk; eta, theta, alpha are learned per head. State: the
    weights, the momentum, the chunk-start weights and the position inside the chunk."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, expansion: int = 2,
                 chunk: int = 16):
        super().__init__(d_model, n_heads, head_dim)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk: expected a positive int (tokens per memory update), got {chunk!r}")
        H, D = n_heads, self.head_dim
        self.chunk, self.hidden = chunk, expansion * D
        self.qkv = nn.Linear(d_model, 3 * H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)
        self.w1_init = nn.Parameter(torch.randn(H, self.hidden, D) * D ** -0.5)
        self.w2_init = nn.Parameter(torch.randn(H, D, self.hidden) * self.hidden ** -0.5)
        self.logits = nn.Parameter(torch.tensor([1.0, -4.0, -4.0]).repeat(H, 1))  # eta, theta, alpha (sigmoid)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        H, D, E = self.n_heads, self.head_dim, self.hidden
        shapes = {}
        for p in ("w", "s", "w0"):
            shapes[f"{p}1"], shapes[f"{p}2"] = (batch, H, E, D), (batch, H, D, E)
        return {**shapes, "pos": (batch,)}

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> State:
        state = super().init_state(batch, dtype, device)
        for p in ("w", "w0"):  # the memory starts from learned weights (all-zero weights get zero gradients)
            state[f"{p}1"] = self.w1_init.to(dtype).expand(batch, -1, -1, -1)
            state[f"{p}2"] = self.w2_init.to(dtype).expand(batch, -1, -1, -1)
        return state

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def _rates(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        eta, theta, alpha = torch.sigmoid(self.logits.to(dtype)).unbind(-1)
        return eta, theta, alpha

    def _segment(self, q: Tensor, k: Tensor, v: Tensor, st: State) -> tuple[Tensor, State]:
        """Tokens q, k, v [B, H, T, D] that all lie in one chunk: the recurrence in closed form (decay matrices)."""
        T = q.shape[2]
        eta, theta, alpha = (r.view(1, -1, 1) for r in self._rates(q.dtype))
        g1, g2 = memory_grads(st["w01"], st["w02"], k, v)
        t = torch.arange(1, T + 1, device=q.device, dtype=q.dtype)
        lag = (t[:, None] - t[None, :]).clamp(min=0)
        low = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        L_eta = torch.where(low, eta[..., None] ** lag, 0)  # [1, H, T, T]: eta^(t - i) for i <= t
        L_ret = torch.where(low, (1 - alpha)[..., None] ** lag, 0)
        eta_t, ret_t = eta ** t, (1 - alpha) ** t  # [1, H, T]
        out = {}
        ws = []
        for n, g in (("1", g1), ("2", g2)):
            s = (eta_t[..., None, None] * st["s" + n][:, :, None]
                 - theta[..., None, None] * torch.einsum("bhti,bhi...->bht...", L_eta.expand(g.shape[0], -1, -1, -1),
                                                         g))
            w = ret_t[..., None, None] * st["w" + n][:, :, None] + torch.einsum(
                "bhti,bhi...->bht...", L_ret.expand(g.shape[0], -1, -1, -1), s)
            ws.append(w)
            out["s" + n], out["w" + n], out["w0" + n] = s[:, :, -1], w[:, :, -1], st["w0" + n]
        return memory_read(ws[0], ws[1], q), out

    def _run(self, q: Tensor, k: Tensor, v: Tensor, state: State) -> tuple[Tensor, State]:
        pos = int(state["pos"][0]) if state["pos"].numel() else 0
        st = {n: t for n, t in state.items() if n != "pos"}
        outs, i, S = [], 0, q.shape[2]
        while i < S:
            if pos % self.chunk == 0:  # a new chunk: gradients are taken at the current weights
                st["w01"], st["w02"] = st["w1"], st["w2"]
            n = min(self.chunk - pos % self.chunk, S - i)
            o, st = self._segment(q[:, :, i:i + n], k[:, :, i:i + n], v[:, :, i:i + n], st)
            outs.append(o)
            i, pos = i + n, pos + n
        B = q.shape[0]
        st["pos"] = torch.full((B,), float(pos % self.chunk), dtype=q.dtype, device=q.device)
        return torch.cat(outs, 2), st

    def _output(self, o: Tensor) -> Tensor:
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        o, st = self._run(*self._qkv(x), state)
        return self._output(o), st

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """One token: the plain online update (no closed form), gradient at the chunk-start weights."""
        q, k, v = self._qkv(x_t[:, None])
        st = dict(state)
        if int(st["pos"][0]) % self.chunk == 0:
            st["w01"], st["w02"] = st["w1"], st["w2"]
        eta, theta, alpha = (r.view(1, -1, 1, 1) for r in self._rates(q.dtype))
        g1, g2 = memory_grads(st["w01"], st["w02"], k, v)
        for n, g in (("1", g1[:, :, 0]), ("2", g2[:, :, 0])):
            st["s" + n] = eta * st["s" + n] - theta * g
            st["w" + n] = (1 - alpha) * st["w" + n] + st["s" + n]
        o = memory_read(st["w1"][:, :, None], st["w2"][:, :, None], q)
        st["pos"] = (st["pos"] + 1) % self.chunk
        return self._output(o)[:, 0], st
