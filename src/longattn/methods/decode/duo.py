"""DuoAttention (Xiao et al., 2024): retrieval heads keep the full cache, streaming heads only attention sinks and
recent tokens. Which heads retrieve comes from per-(layer, kv head) gates optimised once per model end to end on
synthetic passkey data (``duo_gates.optimize_gates``, ``longattn calibrate duo``) and saved as JSON.

Storage: each layer's retrieval heads sit in a full-length ``LongattnLayer`` and its streaming heads in a
``WindowLayer`` (sinks + a ring of recent tokens), joined by a ``HeadSplitLayer`` when a layer has both, so the
streaming heads' bytes stay at ``sinks + recent`` tokens whatever the context. A streaming head's query at position
t reads keys at positions < sinks or > t - recent (the window the gates are calibrated with); the prompt itself is
attended densely by every head."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longattn.hf.cache import HeadSplitLayer, LongattnLayer, WindowLayer
from longattn.methods.decode.base import DecodePolicy, check_fraction, check_int
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
                                    f"model with `longattn calibrate duo --out PATH` (or "
                                    f"duo_gates.optimize_gates(model, path))")
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
