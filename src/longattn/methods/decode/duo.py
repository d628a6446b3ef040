"""DuoAttention (Xiao et al., 2024): retrieval heads keep the full cache, streaming heads only attention sinks and
recent tokens. Which heads retrieve comes from per-(layer, kv head) gates optimised once per model on synthetic
passkey data (``optimize_gates``) and saved as JSON.

Storage: each layer's retrieval heads sit in a full-length ``LongattnLayer`` and its streaming heads in a
``WindowLayer`` (sinks + a ring of recent tokens), joined by a ``HeadSplitLayer`` when a layer has both, so the
streaming heads' bytes stay at ``sinks + recent`` tokens whatever the context. A streaming head's query at position
t reads keys at positions < sinks or > t - recent (the window the gates are calibrated with, ``streaming_error``);
the prompt itself is attended densely by every head.

Gate optimisation here is per head and local: α minimises (1 - α)² · d + λ·α, where d is the relative error of
the streaming output against the full output of that head on the passkey prompts (the paper optimises all gates
end to end against the final hidden states; the trade-off — error where a head streams vs an L1 push to
stream — is the same)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from longattn.api import attention
from longattn.hf.cache import HeadSplitLayer, LongattnLayer, WindowLayer
from longattn.masks.core import MaskMod
from longattn.methods.decode.base import DecodePolicy, check_fraction, check_int
from longattn.methods.decode.calibration import capture_qkv, passkey_ids
from longattn.methods.registry import register


@register("duo", "decode", paper="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming "
                                 "Heads (2024)")
class DuoAttention(DecodePolicy):
    """Heads whose gate ranks in the top ``1 - sparsity`` keep everything; the rest keep ``sinks`` + ``recent``."""

    def __init__(self, gates_path: str | Path | None = None, sparsity: float = 0.5, sinks: int = 64,
                 recent: int = 256):
        super().__init__(None)
        check_fraction("sparsity", sparsity)
        check_int("sinks", sinks, minimum=0)
        check_int("recent", recent)
        if gates_path is None or not Path(gates_path).is_file():
            raise FileNotFoundError(f"gates_path: no DuoAttention gate file at {gates_path!r}; create one once per "
                                    f"model with `longattn calibrate duo --out PATH` (or optimize_gates(model, path))")
        gates = torch.tensor(json.loads(Path(gates_path).read_text())["gates"], dtype=torch.float32)
        if gates.dim() != 2:
            raise ValueError(f"gates_path: expected gates as [layers][kv_heads], got shape {tuple(gates.shape)}")
        self.gates, self.sparsity, self.sinks, self.recent = gates, sparsity, sinks, recent
        n_stream = int(round(sparsity * gates.numel()))
        order = torch.sort(gates.flatten(), stable=True).indices  # lowest gates stream
        retrieval = torch.ones(gates.numel(), dtype=torch.bool)
        retrieval[order[:n_stream]] = False
        self.retrieval = retrieval.view_as(gates)

    def bind(self, config):
        super().bind(config)
        want = (self.num_layers, int(config.num_key_value_heads))
        if tuple(self.gates.shape) != want:
            raise ValueError(f"gates_path: gates of shape {tuple(self.gates.shape)} do not fit this model "
                             f"({want[0]} layers x {want[1]} kv heads); optimise gates for this model")

    def make_layer(self, layer_idx: int, offload: str | None = None):
        """Retrieval heads full length, streaming heads sinks + recent; one store when all heads are alike."""
        retrieval = self.retrieval[layer_idx]
        full = retrieval.nonzero().flatten().tolist()
        stream = (~retrieval).nonzero().flatten().tolist()
        if not stream:
            return LongattnLayer(offload=offload)
        window = WindowLayer(self.sinks, self.recent, offload=offload)
        if not full:
            return window
        return HeadSplitLayer([(full, LongattnLayer(offload=offload)), (stream, window)])

    def apply_compress(self, layer_idx, layer):
        """Nothing to evict: the layer's stores already keep exactly what each head needs."""
        layer.queries = None
        layer.compressed = True


def streaming_error(q: Tensor, k: Tensor, v: Tensor, sinks: int, recent: int) -> Tensor:
    """Per kv head [Hkv]: relative squared error of sink+recent attention against full causal attention, over the
    second half of the positions (where the streaming heads have really dropped tokens)."""
    S = q.shape[2]

    def sink_recent(b, h, qi, kv):
        return (kv < sinks) | (kv > qi - recent)

    full = attention(q, k, v, causal=True, impl="reference")
    stream = attention(q, k, v, mask=MaskMod(sink_recent), causal=True, impl="reference")
    half = slice(S // 2, S)
    err = ((full - stream)[:, :, half].float() ** 2).sum((0, 2, 3))
    ref = (full[:, :, half].float() ** 2).sum((0, 2, 3)).clamp(min=1e-12)
    return (err / ref).view(k.shape[1], -1).mean(1)


def fit_gates(errors: Tensor, lam: float, steps: int = 300, lr: float = 0.05) -> Tensor:
    """Gates in [0, 1] minimising (1 - α)² · error + λ·α per head, by projected Adam."""
    alpha = torch.ones_like(errors, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((1 - alpha) ** 2 * errors.float() + lam * alpha).sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0.0, 1.0)
    return alpha.detach()


def optimize_gates(model, path: str | Path, *, samples: int = 2, length: int = 512, sinks: int = 64,
                   recent: int = 256, lam: float = 0.05, steps: int = 300, seed: int = 0) -> Tensor:
    """Optimise DuoAttention gates for ``model`` on synthetic passkey prompts and save them as JSON at ``path``
    (run once per model). Returns the gates [layers, kv_heads]."""
    check_int("length", length, minimum=32)
    if sinks + recent >= length:
        raise ValueError(f"length: {length} tokens leave nothing to drop with sinks={sinks} + recent={recent}; "
                         f"calibrate on longer prompts or a smaller window")
    ids = passkey_ids(samples, length, int(model.config.vocab_size), seed=seed)
    errors = torch.stack([streaming_error(q, k, v, sinks, recent) for q, k, v in capture_qkv(model, ids)])
    gates = fit_gates(errors, lam, steps)
    Path(path).write_text(json.dumps({"model_type": model.config.model_type, "samples": samples, "length": length,
                                      "sinks": sinks, "recent": recent, "lambda": lam,
                                      "errors": errors.tolist(), "gates": gates.tolist()}, indent=1))
    return gates


