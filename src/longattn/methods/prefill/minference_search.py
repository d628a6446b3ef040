"""MInference's offline per-head pattern search and the ``minference`` method that replays it (Jiang et al.,
NeurIPS 2024): on a calibration prompt every head gets the pattern (A-shape, vertical-slash or block-sparse) whose
mask keeps the most dense attention mass (recall); the per-model choice is saved as JSON and ``minference`` builds
one BlockSparse per layer in which each head follows its own pattern."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from longattn.masks.block_sparse import EMPTY, BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.prefill.minference_ashape import ashape_tokens
from longattn.methods.prefill.minference_block import MInferenceBlockSparse
from longattn.methods.prefill.minference_vertical_slash import FORCED_COLUMNS, FORCED_DIAGONALS, vertical_slash_tokens
from longattn.methods.registry import register

FORMAT = "longattn-minference-v1"
PATTERNS = ("ashape", "vertical_slash", "block")
DEFAULT_SPEC = {"pattern": "vertical_slash", "knobs": {"vertical_size": 1000, "slash_size": 6096}}
DEFAULT_CANDIDATES = ({"pattern": "ashape", "knobs": {"n_init": 128, "n_local": 4096}},
                      DEFAULT_SPEC,
                      {"pattern": "block", "knobs": {"top_k": 100}})
_KNOBS = {"ashape": ("n_init", "n_local"), "vertical_slash": ("vertical_size", "slash_size"), "block": ("top_k",)}


def check_spec(spec, where: str) -> dict:
    """One head's entry: {"pattern": one of PATTERNS, "knobs": {its budgets}}; ValueError naming where it sits."""
    if not isinstance(spec, dict) or spec.get("pattern") not in PATTERNS or not isinstance(spec.get("knobs"), dict):
        raise ValueError(f"{where}: expected {{'pattern': one of {PATTERNS}, 'knobs': {{...}}}}, got {spec!r}")
    expected = set(_KNOBS[spec["pattern"]])
    ok = set(spec["knobs"]) == expected and all(isinstance(v, int) and not isinstance(v, bool)
                                                and v >= (0 if name == "n_init" else 1)
                                                for name, v in spec["knobs"].items())
    if not ok:
        raise ValueError(f"{where}: {spec['pattern']} expects int knobs {sorted(expected)} (n_init >= 0, the others "
                         f">= 1), got {spec['knobs']!r}")
    return spec


def head_selection(spec: dict, q: Tensor, k: Tensor, block: int, last_q: int) -> tuple[Tensor, Tensor, Tensor]:
    """(selected blocks [B, h, nQB, nKB], columns, diagonals [B, h, Skv]) of one pattern for the heads of q
    (k already repeated to q's heads); block-sparse heads keep every token of their blocks."""
    B, H, Sq, Skv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    knobs, pattern = spec["knobs"], spec["pattern"]
    grid = _select.causal_blocks(Sq, Skv, (block, block), q.device).shape
    every = torch.ones(B, H, *grid, dtype=torch.bool, device=q.device)
    if pattern == "ashape":
        _select.check_budget("n_init + n_local", knobs["n_init"] + knobs["n_local"], Skv)
        return (every, *ashape_tokens(B, H, Skv, knobs["n_init"], knobs["n_local"], q.device))
    if pattern == "vertical_slash":
        _select.check_budget("vertical_size", knobs["vertical_size"], Skv)
        _select.check_budget("slash_size", knobs["slash_size"], Skv)
        return (every, *vertical_slash_tokens(q, k, last_q, knobs["vertical_size"], knobs["slash_size"],
                                              FORCED_COLUMNS, FORCED_DIAGONALS))
    _select.check_budget("top_k", knobs["top_k"], grid[1], unit="kv blocks")
    cls_map, _ = MInferenceBlockSparse(top_k=knobs["top_k"], block=block).estimate(q, k).block_map()
    everything = torch.ones(B, H, Skv, dtype=torch.bool, device=q.device)
    return (cls_map != EMPTY).expand(B, H, *grid), everything, everything


def layer_block_sparse(specs: list[dict], q: Tensor, k: Tensor, block: int, last_q: int,
                       token_level: bool | None = None) -> BlockSparse:
    """One BlockSparse for a layer whose query heads follow ``specs`` (one per head); heads sharing a spec are
    estimated together."""
    B, H, Sq, Skv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    kr = _select.repeat_kv(k, H)
    grid = _select.causal_blocks(Sq, Skv, (block, block), q.device).shape
    selected = torch.zeros(B, H, *grid, dtype=torch.bool, device=q.device)
    cols = torch.zeros(B, H, Skv, dtype=torch.bool, device=q.device)
    diags = torch.zeros_like(cols)
    groups: dict[str, list[int]] = {}
    for h, spec in enumerate(specs):
        groups.setdefault(json.dumps(spec, sort_keys=True), []).append(h)
    for key, heads in groups.items():
        idx = torch.tensor(heads, device=q.device)
        selected[:, idx], cols[:, idx], diags[:, idx] = head_selection(json.loads(key), q[:, idx], kr[:, idx], block,
                                                                       last_q)
    return _select.build(selected, Sq, Skv, (block, block), columns=cols, diagonals=diags, token_level=token_level)


def recall(bs: BlockSparse, q: Tensor, k: Tensor, rows_per_chunk: int = 256) -> Tensor:
    """Per query head, the share of dense causal attention mass the BlockSparse keeps (mean over batch and rows);
    the dense map is formed ``rows_per_chunk`` queries at a time (calibration only)."""
    B, H, Sq, Skv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    kr = _select.repeat_kv(k, H).float()
    bq = bs.block_size[0]
    step = max(1, rows_per_chunk // bq)
    kept = torch.zeros(B, H, dtype=torch.float64, device=q.device)
    pos = torch.arange(Skv, device=q.device)
    for lo in range(0, len(bs.q_blocks), step):
        hi = min(lo + step, len(bs.q_blocks))
        r0, r1 = lo * bq, min(hi * bq, Sq)
        s = q[:, :, r0:r1].float() @ kr.transpose(-1, -2) / q.shape[-1] ** 0.5
        rows = torch.arange(r0, r1, device=q.device).view(-1, 1) + Skv - Sq
        p = torch.softmax(s.masked_fill(pos.view(1, -1) > rows, float("-inf")), dim=-1)
        kept += (p * bs.dense_rows(lo, hi)).sum((-1, -2)).double()
    return kept.mean(0) / Sq


def search_layer(q: Tensor, k: Tensor, candidates: Iterable[dict] = DEFAULT_CANDIDATES, *, block: int = 64,
                 last_q: int = 64) -> list[dict]:
    """Per query head: the candidate with the highest recall of dense attention (earlier candidates win ties),
    as {"pattern", "knobs", "recall"}."""
    candidates = [check_spec(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
    if not candidates:
        raise ValueError("candidates: expected at least one pattern spec, got none")
    H = q.shape[1]
    scores = torch.stack([recall(layer_block_sparse([c] * H, q, k, block, last_q), q, k) for c in candidates])
    best = scores.argmax(0)
    return [{**candidates[int(best[h])], "recall": float(scores[best[h], h])} for h in range(H)]


def search(model_or_samples, input_ids: Tensor | None = None, candidates: Iterable[dict] = DEFAULT_CANDIDATES, *,
           block: int = 64, last_q: int = 64, model_name: str = "") -> dict:
    """The per-model config: a transformers model with calibration ``input_ids``, or (layer, q, k) samples."""
    if input_ids is not None:
        model_name = model_name or getattr(model_or_samples.config, "_name_or_path", "") or ""
    samples = _select.qk_samples(model_or_samples, input_ids)
    candidates = list(candidates)
    layers: dict[int, list[dict]] = {}
    for layer, q, k in samples:
        layers[int(layer)] = search_layer(q, k, candidates, block=block, last_q=last_q)
    return {"format": FORMAT, "model": model_name, "block": block, "last_q": last_q,
            "layers": {str(i): heads for i, heads in sorted(layers.items())}}


def save_config(config: dict, path: str | Path) -> None:
    """Write a search result as JSON."""
    Path(path).write_text(json.dumps(config, indent=1))


def load_config(path_or_config: str | Path | dict) -> dict:
    """Read and validate a search result (a path or an already loaded dict)."""
    cfg = path_or_config if isinstance(path_or_config, dict) else json.loads(Path(path_or_config).read_text())
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("layers"), dict):
        raise ValueError(f"config: expected a {FORMAT} search result with 'layers', got keys "
                         f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
    for layer, heads in cfg["layers"].items():
        for h, spec in enumerate(heads):
            check_spec({"pattern": spec.get("pattern"), "knobs": spec.get("knobs")}, f"config layer {layer} head {h}")
    return cfg


@register("minference", "prefill", paper="MInference 1.0 (Jiang et al. 2024), searched per-head patterns")
class MInference(PrefillMethod):
    """Replays a per-head pattern config (``search`` / ``save_config``): each head of each layer runs its own
    A-shape, vertical-slash or block-sparse pattern inside one shared BlockSparse. Heads and layers the config does
    not list use vertical-slash with MInference's default budgets (1000 columns, 6096 diagonals), as the paper's
    release does; without a config every head does. Vertical-slash heads always keep the first 30 columns and the
    100 nearest diagonals, as MInference's kernel does."""

    def __init__(self, config: str | Path | dict | None = None, token_level: bool | None = None):
        self.config = load_config(config) if config is not None else None
        block = self.config["block"] if self.config else 64
        self.block = (_select.check_block("config block", block),) * 2
        self.last_q = _select.check_int("config last_q", self.config["last_q"] if self.config else 64)
        self.token_level = token_level

    def specs(self, layer: int, heads: int) -> list[dict]:
        """The per-head specs of one layer (defaults where the config has none)."""
        listed = self.config["layers"].get(str(layer), []) if self.config else []
        if listed and len(listed) != heads:
            raise ValueError(f"config: layer {layer} lists {len(listed)} heads, the model has {heads} query heads")
        return [{"pattern": s["pattern"], "knobs": s["knobs"]} for s in listed] or [DEFAULT_SPEC] * heads

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        self.last_blocks = layer_block_sparse(self.specs(layer, q.shape[1]), q, k, self.block[0], self.last_q,
                                              self.token_level)
        return self.last_blocks
