"""KIVI-style quantised cache layer: keys quantised per channel (min/max over groups of ``group`` tokens), values
per token (min/max over groups of ``group`` channels), the newest ``residual`` tokens kept in full precision;
dequantised on read. int8 or int4 (two codes per byte)."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.hf.cache import LongattnLayer

BITS = (4, 8)


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uniform quantisation of x over axis ``dim`` (the group axis): (codes uint8, scale, minimum)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=torch.finfo(x.dtype).tiny)
    codes = ((x - lo) / scale).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def pack4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last axis (its length must be even)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: Tensor) -> Tensor:
    """Inverse of ``pack4``."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


class QuantizedLayer(LongattnLayer):
    """Uniform lengths (no eviction): quantised history + a full-precision residual window in ``keys``/``values``.
    Keys are quantised ``group`` tokens at a time once more than ``residual + group`` tokens sit unquantised."""

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 128, offload: str | None = None):
        super().__init__(offload=offload)
        self.bits, self.group, self.residual = bits, group, residual
        self.qk = self.k_scale = self.k_min = self.qv = self.v_scale = self.v_min = None

    def reset(self) -> None:
        self.__init__(self.bits, self.group, self.residual, self.offload_mode)

    @property
    def capacity(self) -> int:
        return self.pos.shape[2]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        D = key_states.shape[-1]
        if D % self.group and self.group % D:
            raise ValueError(f"group: {self.group} must divide head_dim {D} (or be a multiple of it)")
        if self.bits == 4 and D % 2:
            raise ValueError(f"bits: int4 packs two codes per byte and needs an even head_dim, got {D}")

    def append(self, k: Tensor, v: Tensor) -> None:
        self._concat(k, v)
        r = self.keys.shape[2]
        m = (r - self.residual) // self.group
        if m > 0:
            self._quantize_oldest(m * self.group)

    def _quantize_oldest(self, t: int) -> None:
        B, H, _, D = self.keys.shape
        k, v = self.keys[:, :, :t], self.values[:, :, :t]
        kc, ks, kmin = quantize(k.reshape(B, H, t // self.group, self.group, D), self.bits, 3)
        gv = min(self.group, D)
        vc, vs, vmin = quantize(v.reshape(B, H, t, D // gv, gv), self.bits, 4)
        kc, vc = kc.reshape(B, H, t, D), vc.reshape(B, H, t, D)
        if self.bits == 4:
            kc, vc = pack4(kc), pack4(vc)
        parts = {"qk": kc, "k_scale": ks.squeeze(3), "k_min": kmin.squeeze(3), "qv": vc, "v_scale": vs.squeeze(-1),
                 "v_min": vmin.squeeze(-1)}
        for name, x in parts.items():
            old = getattr(self, name)
            setattr(self, name, x if old is None else torch.cat([old, x], 2))
        self.keys, self.values = self.keys[:, :, t:].clone(), self.values[:, :, t:].clone()

    def kv(self) -> tuple[Tensor, Tensor]:
        """Dequantised history followed by the residual window, [B, Hkv, seen, D] on the compute device."""
        keys, values = self.keys.to(self.device), self.values.to(self.device)
        if self.qk is None:
            return keys, values
        B, H, _, D = keys.shape
        kc, vc = (unpack4(self.qk), unpack4(self.qv)) if self.bits == 4 else (self.qk, self.qv)
        t = kc.shape[2]
        gv = min(self.group, D)
        k = kc.view(B, H, t // self.group, self.group, D).to(self.dtype) * self.k_scale[:, :, :, None] + \
            self.k_min[:, :, :, None]
        v = vc.view(B, H, t, D // gv, gv).to(self.dtype) * self.v_scale[..., None] + self.v_min[..., None]
        return torch.cat([k.reshape(B, H, t, D), keys], 2), torch.cat([v.reshape(B, H, t, D), values], 2)

    def evict(self, keep: Tensor) -> None:
        raise ValueError("policy: the quantised (KIVI) cache keeps every token; it cannot be combined with eviction")

    def _quant(self) -> list[Tensor]:
        quant = [self.qk, self.k_scale, self.k_min, self.qv, self.v_scale, self.v_min]
        return [t for t in quant if t is not None]

    def tensors(self) -> list[Tensor]:
        return super().tensors() + self._quant()

    def kv_tensors(self) -> list[Tensor]:
        return super().kv_tensors() + self._quant()  # codes, scales and minima are the payload
