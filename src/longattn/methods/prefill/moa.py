"""MoA, Mixture of Sparse Attention (Fu et al. 2024): every head gets its own sliding window that grows with the
input as ``window = alpha + beta * length`` (the elastic rule); an offline profiling search picks each head's
rule from calibration data under one global density budget, and the result is saved per model as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from longattn import masks
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill._blocks import geometry, square_block, to_block_sparse
from longattn.methods.prefill._select import check_fraction
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register

FORMAT = "longattn.moa/1"
ALPHAS = (64, 128, 256, 512, 1024, 2048)  # window base, tokens
BETAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # window growth per token of input (1.0 = dense)


@dataclass
class MoAConfig:
    """Per layer, one (alpha, beta) elastic rule per query head; ``density`` is the budget it was searched for
    (mean fraction of causal attention kept over heads, layers and calibration lengths)."""

    rules: dict[int, list[tuple[float, float]]]
    density: float = 1.0
    model: str = ""
    lengths: list[int] = field(default_factory=list)

    def windows(self, layer: int, length: int) -> list[int]:
        """Each head's window for a context of ``length`` tokens (at least 1, at most the context)."""
        if layer not in self.rules:
            raise ValueError(f"layer: the MoA config has rules for layers {sorted(self.rules)}, not layer {layer}")
        return [max(1, min(length, round(a + b * length))) for a, b in self.rules[layer]]

    def save(self, path: str | Path) -> None:
        """Write the config as JSON."""
        data = {"format": FORMAT, "model": self.model, "density": self.density, "lengths": self.lengths,
                "layers": {str(layer): [list(r) for r in rules] for layer, rules in sorted(self.rules.items())}}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> MoAConfig:
        """Read a config written by ``save``."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"config: {str(path)!r} is not a MoA config (expected format {FORMAT!r})")
        rules = {int(layer): [(float(a), float(b)) for a, b in heads] for layer, heads in data["layers"].items()}
        return cls(rules, float(data["density"]), data.get("model", ""), list(data.get("lengths", [])))


@register("moa", "prefill", paper="MoA: Mixture of Sparse Attention (Fu et al. 2024), searched elastic windows")
class MoA(PrefillMethod):
    """Per-head sliding windows from a searched ``MoAConfig`` (object or JSON path, see ``search_moa`` and
    ``calibrate_moa``); token-exact windows inside 64-token blocks by default."""

    def __init__(self, config: MoAConfig | str | Path, block: int = 64):
        if isinstance(config, (str, Path)):
            config = MoAConfig.load(config)
        if not isinstance(config, MoAConfig):
            raise TypeError(f"config: expected a MoAConfig or a JSON path, got {type(config).__name__}")
        self.config, self.block = config, square_block(block)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, _ = q.shape
        Skv = k.shape[2]
        windows = self.config.windows(layer, Skv)
        if len(windows) != Hq:
            raise ValueError(f"config: layer {layer} has rules for {len(windows)} heads, the input has {Hq}")
        geo = geometry(Sq, Skv, self.block, q.device)
        selected = geo.window(torch.tensor(windows, device=q.device)).expand(B, Hq, *geo.area.shape)
        rule = masks.per_head_window(windows, offset=geo.offset)
        self.last_blocks = to_block_sparse(selected, geo, rule)
        return self.last_blocks


def window_density(window: int, length: int) -> float:
    """Fraction of the causal pairs of a ``length``-token input that a causal window keeps."""
    w = min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / (length * (length + 1) / 2)


def search_moa(samples: Mapping[int, tuple[Tensor, Tensor, Tensor]], *, density: float,
               alphas: Sequence[float] = ALPHAS, betas: Sequence[float] = BETAS,
               lengths: Sequence[int] | None = None, model: str = "") -> MoAConfig:
    """Pick one elastic rule per (layer, head) from ``alphas`` x ``betas`` minimising the summed relative
    attention-output error against dense (over the calibration ``lengths``: prefixes of the samples, default half
    and all of the shortest) subject to a mean density <= ``density`` over all heads and layers.

    samples: {layer: (q [B, Hq, S, D], k [B, Hkv, S, D], v)} post-RoPE, e.g. from ``capture_qkv``. The choice is a
    multiple-choice knapsack, solved by Lagrangian relaxation (bisection on the price of density); MoA solves the
    same problem as a mixed-integer program.
    """
    budget = check_fraction("density", density)
    if not samples:
        raise ValueError("samples: expected calibration q, k, v for at least one layer, got none")
    for layer, (q, k, _) in samples.items():
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"samples: layer {layer} has {q.shape[2]} queries for {k.shape[2]} keys; calibration "
                             "needs one full prefill (as many queries as keys)")
    shortest = min(int(k.shape[2]) for _, k, _ in samples.values())
    lengths = sorted({max(1, shortest // 2), shortest}) if lengths is None else [int(n) for n in lengths]
    if not lengths or any(not 1 <= n <= shortest for n in lengths):
        raise ValueError(f"lengths: expected calibration lengths in [1, {shortest}] (the shortest sample), "
                         f"got {lengths}")
    # densest-growing first: among rules tied on error and density, argmax keeps the first (highest beta)
    rules = sorted({(float(a), float(b)) for a in alphas for b in betas}, key=lambda r: (-r[1], -r[0]))
    if not rules or any(a < 0 or not 0 <= b <= 1 for a, b in rules):
        raise ValueError(f"alphas, betas: expected non-empty alphas >= 0 and betas in [0, 1], got {alphas}, {betas}")
    errs, dens, heads = [], [], []
    for layer, (q, k, v) in sorted(samples.items()):
        err, den = _profile(q, k, v, rules, lengths)
        errs.append(err)
        dens.append(den)
        heads.append((layer, err.shape[0]))
    pick = _choose(torch.cat(errs), torch.cat(dens), budget)
    out, start = {}, 0
    for layer, n in heads:
        out[layer] = [rules[int(i)] for i in pick[start:start + n]]
        start += n
    return MoAConfig(out, budget, model, list(lengths))


def _profile(q: Tensor, k: Tensor, v: Tensor, rules, lengths) -> tuple[Tensor, Tensor]:
    """err, density [Hq, n_rules]: relative output error vs dense (summed over lengths) and mean density."""
    Hq = q.shape[1]
    err = torch.zeros(Hq, len(rules), dtype=torch.float64)
    den = torch.zeros(Hq, len(rules), dtype=torch.float64)
    for n in lengths:
        qn, kn, vn = q[:, :, :n], k[:, :, :n], v[:, :, :n]
        dense, _ = reference_attention(qn, kn, vn, causal=True, compute_dtype=torch.float32)
        scale = dense.double().pow(2).sum(-1).mean(dim=(0, 2)).clamp(min=1e-30)  # [Hq]
        by_window: dict[int, Tensor] = {}
        for j, (a, b) in enumerate(rules):
            w = max(1, min(n, round(a + b * n)))
            if w not in by_window:
                out, _ = reference_attention(qn, kn, vn, mask=masks.sliding_window(w), compute_dtype=torch.float32)
                by_window[w] = (out.double() - dense.double()).pow(2).sum(-1).mean(dim=(0, 2)) / scale
            err[:, j] += by_window[w]
            den[:, j] += window_density(w, n) / len(lengths)
    return err, den


def _choose(err: Tensor, den: Tensor, budget: float) -> Tensor:
    """Index of one rule per head minimising total error with mean density <= budget (Lagrangian bisection)."""
    floor = float(den.min(-1).values.mean())
    if floor > budget + 1e-12:
        raise ValueError(f"density: budget {budget} is below {floor:.4f}, the density of the sparsest candidate "
                         f"rules at the calibration lengths; add smaller alphas / betas or raise the budget")

    def pick(price: float) -> Tensor:
        cost = err + price * den
        best = cost.min(-1, keepdim=True).values
        tied = cost <= best + 1e-12 * (1 + best.abs())
        return torch.where(tied, den, -1.0).argmax(-1)  # among equal costs the densest, then the highest beta

    def mean_density(idx: Tensor) -> float:
        return float(den.gather(1, idx.view(-1, 1)).mean())

    if mean_density(pick(0.0)) <= budget + 1e-12:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while mean_density(pick(hi)) > budget + 1e-12:
        lo, hi = hi, hi * 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mean_density(pick(mid)) <= budget + 1e-12 else (mid, hi)
    return pick(hi)


def capture_qkv(model, input_ids: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Post-RoPE (q, k, v) of every attention layer in one forward of a transformers model: MoA's calibration data.
    Routes attention through a capturing wrapper around transformers' SDPA function, then restores the model."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    captured: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured[int(module.layer_idx)] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = "longattn_moa_capture"
    AttentionInterface.register(name, capture)
    AttentionMaskInterface.register(name, sdpa_mask)
    configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
    previous = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        with torch.no_grad():
            model(input_ids)
    finally:
        for c, p in zip(configs, previous, strict=True):
            c._attn_implementation = p
    return captured


def calibrate_moa(model, input_ids: Tensor, *, density: float, path: str | Path | None = None,
                  **search_kwargs) -> MoAConfig:
    """Capture calibration q, k, v from ``model`` on ``input_ids``, search the rules, and save them to ``path``."""
    config = search_moa(capture_qkv(model, input_ids), density=density,
                        model=getattr(model.config, "_name_or_path", "") or model.config.model_type, **search_kwargs)
    if path is not None:
        config.save(path)
    return config
