"""KIVI (Liu et al., 2024): a tuning-free asymmetric quantised KV cache; keys per channel, values per token, the
recent tokens kept in full precision. Here at int8 or int4 (the paper goes down to 2 bits)."""

from __future__ import annotations

from longattn.hf.quant_cache import BITS, QuantizedLayer
from longattn.methods.decode.base import DecodePolicy, check_int
from longattn.methods.registry import register


@register("kivi", "decode", paper="KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (2024)")
class KIVI(DecodePolicy):
    """Keeps every token, quantised: ``bits`` in (4, 8), ``group`` tokens (keys) / channels (values) per scale,
    the newest ``residual`` tokens unquantised."""

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 128):
        super().__init__(None)
        if bits not in BITS:
            raise ValueError(f"bits: expected one of {BITS}, got {bits!r}")
        check_int("group", group)
        check_int("residual", residual, minimum=0)
        self.bits, self.group, self.residual = bits, group, residual

    def make_layer(self, layer_idx, offload=None):
        return QuantizedLayer(self.bits, self.group, self.residual, offload=offload)
