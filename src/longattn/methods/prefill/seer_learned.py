"""SeerAttention's learnable gate (Gao et al. 2024): per head, linear projections of the pooled query (mean) and
the pooled key (max, min, mean concatenated) give a softmax over key blocks, trained by self-distillation (KL)
towards the block-pooled dense attention map of the frozen model; the trained gate picks blocks at inference."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, _mean_pool
from longattn.methods.prefill.seer import causal_log_softmax, check_gate_knobs, gate_select, pooled_keys
from longattn.methods.registry import register


class SeerGate(nn.Module):
    """One layer's gate: wq [H, D, G] on the mean-pooled query, wk [H, 3 D, G] on the pooled key. Initialised so
    the untrained gate equals the mean-pooled q · k block estimate (wq = I, wk = [0; 0; I]) with G = D."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        eye = torch.eye(head_dim).expand(heads, head_dim, head_dim)
        self.wq = nn.Parameter(eye.clone())
        self.wk = nn.Parameter(torch.cat([torch.zeros(heads, 2 * head_dim, head_dim), eye], 1))

    def forward(self, q: Tensor, k: Tensor, block: tuple[int, int]) -> Tensor:
        """log gate probabilities [B, Hq, nQB, nKB] (causal at block granularity) for q [B, Hq, Sq, D], k GQA."""
        H, Sq, Skv = q.shape[1], q.shape[2], k.shape[2]
        if self.wq.shape[0] != H or q.shape[-1] != self.wq.shape[1]:
            raise ValueError(f"q: gate expects {self.wq.shape[0]} heads of dim {self.wq.shape[1]}, got "
                             f"{H} heads of dim {q.shape[-1]}")
        gq = _mean_pool(q.float(), block[0]) @ self.wq
        gk = pooled_keys(_select.repeat_kv(k, H), block[1]) @ self.wk
        return causal_log_softmax(gq @ gk.transpose(-1, -2) / math.sqrt(gq.shape[-1]), Sq, Skv, block)


class SeerGates(nn.Module):
    """The gates of every layer, by layer index; ``save`` / ``load`` use safetensors."""

    def __init__(self, layers: dict[int, tuple[int, int]], block: int = 64):
        super().__init__()
        self.block = (_select.check_block("block", block),) * 2
        self.gates = nn.ModuleDict({str(i): SeerGate(h, d) for i, (h, d) in sorted(layers.items())})

    def forward(self, q: Tensor, k: Tensor, layer: int) -> Tensor:
        if str(layer) not in self.gates:
            raise ValueError(f"layer: no gate for layer {layer}; gates exist for layers {list(self.gates)}")
        return self.gates[str(layer)](q, k, self.block)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        save_file(tensors, str(path), metadata={"block": str(self.block[0])})

    @classmethod
    def load(cls, path: str | Path) -> SeerGates:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            block = int(f.metadata()["block"])
        tensors = load_file(str(path))
        layers = {int(n.split(".")[1]): tuple(t.shape[:2]) for n, t in tensors.items() if n.endswith(".wq")}
        gates = cls(layers, block)
        gates.load_state_dict(tensors)
        return gates


def block_attention_target(q: Tensor, k: Tensor, block: tuple[int, int], rows_per_chunk: int = 256) -> Tensor:
    """The distillation target [B, Hq, nQB, nKB]: dense causal attention summed over each key block and averaged
    over each query block's rows (a distribution over key blocks); formed a few query blocks at a time."""
    B, H, Sq, D = q.shape
    Skv, (bq, bkv) = k.shape[2], block
    kr = _select.repeat_kv(k, H).float()
    n_kv = math.ceil(Skv / bkv)
    pos = torch.arange(Skv, device=q.device)
    out = []
    step = max(1, rows_per_chunk // bq) * bq
    for r0 in range(0, Sq, step):
        r1 = min(r0 + step, Sq)
        s = q[:, :, r0:r1].float() @ kr.transpose(-1, -2) / math.sqrt(D)
        rows = torch.arange(r0, r1, device=q.device).view(-1, 1) + Skv - Sq
        p = torch.softmax(s.masked_fill(pos.view(1, -1) > rows, float("-inf")), dim=-1)
        p = torch.nn.functional.pad(p, (0, n_kv * bkv - Skv)).view(B, H, r1 - r0, n_kv, bkv).sum(-1)
        out.append(_mean_pool(p, bq))
    return torch.cat(out, 2)


def distill_loss(gates: SeerGates, samples: list[tuple[int, Tensor, Tensor, Tensor]]) -> Tensor:
    """Mean KL(target || gate) over query blocks of all samples (layer, q, k, target)."""
    losses = []
    for layer, q, k, target in samples:
        log_gate = gates(q, k, layer)
        kl = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - log_gate), 0.0).sum(-1)
        losses.append(kl.mean())
    return torch.stack(losses).mean()


def distill(model_or_qk_samples, input_ids: Tensor | None = None, *, steps: int = 100, lr: float = 1e-3,
            block: int = 64, gates: SeerGates | None = None, path: str | Path | None = None) -> SeerGates:
    """Train gates by distillation from dense block attention: ``model_or_qk_samples`` is a transformers model
    (with calibration ``input_ids``) or an iterable of (layer, q, k) post-RoPE samples. The model stays frozen;
    only the gates learn (Adam). Saves safetensors to ``path`` when given; ``gates.history`` holds the losses."""
    _select.check_int("steps", steps, low=0)
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    raw: Iterable = _select.qk_samples(model_or_qk_samples, input_ids)
    raw = [(int(layer), q.detach(), k.detach()) for layer, q, k in raw]
    if not raw:
        raise ValueError("model_or_qk_samples: expected at least one (layer, q, k) sample, got none")
    if gates is None:
        gates = SeerGates({layer: (q.shape[1], q.shape[3]) for layer, q, _ in raw}, block)
    gates = gates.to(raw[0][1].device)
    samples = [(layer, q, k, block_attention_target(q, k, gates.block)) for layer, q, k in raw]
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = distill_loss(gates, samples)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        history.append(float(distill_loss(gates, samples)))
    gates.history = history
    if path is not None:
        gates.save(path)
    return gates


@register("seer_learned", "prefill", paper="SeerAttention (Gao et al. 2024), learned AttnGate")
class SeerLearned(PrefillMethod):
    """Blocks chosen by trained gates (``distill``; a safetensors path or a SeerGates). Without weights the gates
    start untrained (mean-pooled q · k estimate). Defaults as SeerAttention: 64-token blocks (the gates' own),
    threshold 5e-4 on the gate probability; top_k key blocks per query block replaces it when given."""

    def __init__(self, weights: str | Path | SeerGates | None = None, threshold: float = 5e-4,
                 top_k: int | None = None, block: int = 64):
        self.threshold, self.top_k = check_gate_knobs(threshold, top_k)
        if weights is not None and not isinstance(weights, (str, Path, SeerGates)):
            raise TypeError(f"weights: expected a safetensors path or SeerGates, got {type(weights).__name__}")
        self.trained = weights is not None
        self.gates = SeerGates.load(weights) if isinstance(weights, (str, Path)) else weights
        if self.gates is None:
            self.gates = SeerGates({}, _select.check_block("block", block))
        self.block = self.gates.block

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        Sq, Skv = q.shape[2], k.shape[2]
        if self.top_k is not None:
            _select.check_budget("top_k", self.top_k, math.ceil(Skv / self.block[1]), unit="kv blocks")
        with torch.no_grad():
            gate = self._gates(q, layer)(q, k, layer).exp()
        selected = gate_select(gate, self.threshold, self.top_k, Sq, Skv, self.block)
        self.last_blocks = _select.build(selected, Sq, Skv, self.block)
        return self.last_blocks

    def _gates(self, q: Tensor, layer: int) -> SeerGates:
        """The gates on q's device; untrained gates gain a layer on first use (trained ones must have it)."""
        if not self.trained and str(layer) not in self.gates.gates:
            self.gates.gates[str(layer)] = SeerGate(q.shape[1], q.shape[3])
        return self.gates.to(q.device)
