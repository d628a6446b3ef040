"""RazorAttention (Tang et al., 2024): retrieval heads (the strongest induction and echo heads on repeated random
text) keep the full cache; every other head keeps sinks + recent tokens plus one compensation token that stands
for what it dropped (mean key and value, weighted by the dropped count in the softmax)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from longattn.methods.decode.base import DecodePolicy, check_fraction, check_int, positions_mask
from longattn.methods.decode.calibration import capture_qkv
from longattn.methods.registry import register


@register("razor", "decode", paper="RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (2024)")
class RazorAttention(DecodePolicy):
    """Protect the top ``induction_ratio`` heads by induction score and top ``echo_ratio`` by echo score (at least
    one each); compress the rest at the end of prefill to ``sinks`` + ``recent`` + a compensation token."""

    def __init__(self, scores_path: str | Path | None = None, induction_ratio: float = 0.15,
                 echo_ratio: float = 0.01, sinks: int = 4, recent: int = 1024):
        super().__init__(None)
        check_fraction("induction_ratio", induction_ratio)
        check_fraction("echo_ratio", echo_ratio)
        check_int("sinks", sinks, minimum=0)
        check_int("recent", recent)
        if scores_path is None or not Path(scores_path).is_file():
            raise FileNotFoundError(f"scores_path: no RazorAttention head-score file at {scores_path!r}; create one "
                                    f"once per model with longattn.methods.decode.razor.head_scores(model, path)")
        data = json.loads(Path(scores_path).read_text())
        induction, echo = torch.tensor(data["induction"]), torch.tensor(data["echo"])
        self.retrieval = _top(induction, induction_ratio) | _top(echo, echo_ratio)
        self.sinks, self.recent = sinks, recent

    def bind(self, config):
        super().bind(config)
        want = (self.num_layers, int(config.num_key_value_heads))
        if tuple(self.retrieval.shape) != want:
            raise ValueError(f"scores_path: head scores of shape {tuple(self.retrieval.shape)} do not fit this model "
                             f"({want[0]} layers x {want[1]} kv heads)")

    def compress(self, layer_idx, keys, values, queries, positions):
        valid = positions >= 0
        keep = positions_mask(positions, valid, first=self.sinks, last=self.recent, seen=positions.shape[-1])
        return keep | (valid & self.retrieval[layer_idx].to(valid.device)[None, :, None])

    def apply_compress(self, layer_idx, layer):
        n = int(layer.lengths.max())
        keys, values = (t[:, :, :n].float() for t in layer.kv())
        dropped = ~self.compress(layer_idx, keys, values, None, layer.pos[:, :, :n]) & layer.valid()[:, :, :n]
        count = dropped.sum(-1)  # [B, Hkv]
        w = dropped[..., None].float() / count.clamp(min=1)[..., None, None]
        k_mean, v_mean = (keys * w).sum(2), (values * w).sum(2)
        super().apply_compress(layer_idx, layer)
        has = count > 0
        if not bool(has.any()):
            return
        if int(layer.lengths.max()) + 1 > layer.capacity:  # heads without a token to add write an unused slot
            layer._resize(int(layer.lengths.max()) + 1)
        slot = layer.lengths[..., None]  # the compensation token goes right after each head's kept tokens
        layer.keys.scatter_(2, slot[..., None].expand(*slot.shape, keys.shape[-1]).to(layer.keys.device),
                            k_mean[:, :, None].to(layer.keys))
        layer.values.scatter_(2, slot[..., None].expand(*slot.shape, values.shape[-1]).to(layer.values.device),
                              v_mean[:, :, None].to(layer.values))
        layer.pos.scatter_(2, slot, torch.zeros_like(slot, dtype=layer.pos.dtype))  # visible to every query
        bias = layer.add_slot_state("logit_bias")
        bias.scatter_(2, slot, count.clamp(min=1).float().log()[..., None])  # counts as `count` tokens
        layer.set_lengths(layer.lengths + has)


def _top(scores: Tensor, ratio: float) -> Tensor:
    """Bool mask of the ceil(ratio × heads) highest scores (at least one when ratio > 0)."""
    k = math.ceil(ratio * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(k).indices] = True
    return mask.view_as(scores)


def head_scores(model, path: str | Path, *, samples: int = 2, length: int = 128, seed: int = 0) -> dict:
    """Echo and induction scores per (layer, kv head) on random tokens repeated twice, saved as JSON at ``path``:
    in the second copy, echo = attention to the earlier occurrence of the same token, induction = to the token
    that followed it (max over the GQA group)."""
    check_int("length", length, minimum=4)
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, int(model.config.vocab_size), (samples, length), generator=g)
    ids = torch.cat([half, half], 1)
    echo, induction = [], []
    for q, k, _ in capture_qkv(model, ids):
        Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
        kx = k.repeat_interleave(Hq // Hkv, 1).float()
        s = q[:, :, length:].float() @ kx.transpose(-1, -2) / math.sqrt(D)  # queries of the second copy
        s = s.masked_fill(torch.arange(2 * length) > torch.arange(length, 2 * length)[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        i = torch.arange(length - 1)
        e = p[:, :, i, i].mean((0, 2))
        ind = p[:, :, i, i + 1].mean((0, 2))
        echo.append(e.view(Hkv, -1).amax(1).tolist())
        induction.append(ind.view(Hkv, -1).amax(1).tolist())
    data = {"model_type": model.config.model_type, "length": length, "echo": echo, "induction": induction}
    Path(path).write_text(json.dumps(data, indent=1))
    return data
