"""ShadowKV (Sun et al., 2024): a low-rank key cache on the GPU, the value cache in CPU memory, and a sparse read
that rebuilds only the keys it needs. At the end of prefill the prompt's keys are cut into chunks of
``chunk_size`` tokens; each chunk's landmark is its mean key; the ``outlier_chunk`` chunks whose tokens agree least
with their landmark (lowest minimum cosine similarity) keep their keys exactly; the last ``local_chunk`` chunks
(plus the remainder of the prompt) and every later token stay exact too; the rest of the prompt's keys are held
only as a rank-``rank`` SVD factorisation (per layer, over all kv heads together, as in the paper). At each step
the query scores the landmarks (softmax per query head, summed over the GQA group), takes the top
``budget // chunk_size`` chunks per kv head, rebuilds just those keys from the factors and fetches just their
values from CPU memory.

Deviation from the paper: ShadowKV factorises the *pre-RoPE* keys and re-applies RoPE to the rebuilt ones. A
transformers attention function only ever sees post-RoPE keys (the rotation happens in the model's own code), so
here the SVD is taken over post-RoPE keys, which are less low-rank: the same rank loses more than in the paper.
Landmarks and outliers are computed on post-RoPE keys in the paper as well.

Defaults are the paper's: a sparse budget of 2048 tokens in chunks of 8, rank 160, 48 outlier chunks, 4 local
chunks. A budget at or above the prompt keeps the prompt exact (everything would be read anyway)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.base import DecodePolicy, check_int, topk_mask
from longattn.methods.registry import register


class ShadowLayer(LongattnLayer):
    """A cache layer that, once ``to_shadow`` ran, holds the first ``prefix`` prompt tokens' keys as low-rank
    factors ``lr_a`` [B, prefix, r] @ ``lr_b`` [B, r, Hkv * D] (+ exact outlier chunks ``out_k``), the later
    tokens' keys exactly in ``keys``, and every value in ``values`` (CPU memory when offloaded). ``read`` (bool
    [B, Hkv, cap], set by the policy for the current step) says which rows ``kv()`` must rebuild and fetch."""

    def __init__(self, page_size=None, offload="values", growth=8):
        super().__init__(page_size=None, offload=offload, growth=growth)
        self.shadow, self.prefix, self.read, self._kv = False, 0, None, None
        self.lr_a = self.lr_b = self.landmarks = self.out_chunks = self.out_k = None

    def reset(self) -> None:
        self.__init__(None, self.offload_mode, self.growth)

    @property
    def capacity(self) -> int:
        return self.pos.shape[2]

    def to_shadow(self, chunk_size: int, rank: int, outlier_chunk: int, local_chunk: int) -> None:
        """Factorise the prompt's chunked keys (all heads uniform: no eviction); see the module docstring."""
        n = int(self.lengths.max())
        cs = chunk_size
        nc = max(0, (n - local_chunk * cs) // cs)
        if nc == 0:
            return
        B, H, _, D = self.keys.shape
        P = nc * cs
        k = self.keys[:, :, :n].to(self.device)
        kp = k[:, :, :P].float()
        U, sv, Vh = torch.linalg.svd(kp.transpose(1, 2).reshape(B, P, H * D), full_matrices=False)
        r = min(rank, sv.shape[-1])
        self.lr_a = (U[..., :r] * sv[:, None, :r]).to(self.dtype)
        self.lr_b = Vh[:, :r].to(self.dtype)
        chunks = kp.view(B, H, nc, cs, D)
        self.landmarks = chunks.mean(3)
        agreement = F.cosine_similarity(chunks, self.landmarks[:, :, :, None], dim=-1).amin(-1)  # [B, H, nc]
        self.out_chunks = topk_mask(-agreement, min(outlier_chunk, nc))  # bool [B, H, nc]
        self.landmarks = self.landmarks.to(self.dtype)
        self.out_k = k[:, :, :P][self.out_chunks.repeat_interleave(cs, -1)].view(B, H, -1, D).clone()
        self.keys = self.keys[:, :, P:n].clone()
        self.values = self.values[:, :, :n].clone()
        self.pos = self.pos[:, :, :n].clone()
        self.prefix, self.shadow = P, True

    def outlier_rows(self) -> Tensor:
        """Bool [B, Hkv, prefix]: rows of the outlier chunks (held exactly)."""
        return self.out_chunks.repeat_interleave(self.prefix // self.out_chunks.shape[-1], -1)

    def append(self, k: Tensor, v: Tensor) -> None:
        if not self.shadow:
            return super().append(k, v)
        self._concat(k, v)
        self._kv = None

    def evict(self, keep: Tensor) -> None:
        raise ValueError("policy: the ShadowKV cache keeps every token (low-rank keys); it cannot evict")

    def kv(self) -> tuple[Tensor, Tensor]:
        """Keys and values [B, Hkv, cap, D] on the compute device; when ``read`` is set only its rows are rebuilt
        (keys) and fetched from CPU memory (values), the other rows are zero (the read masks them out)."""
        if not self.shadow:
            return super().kv()
        if self._kv is not None and self._kv[0] is self.read and self._kv[1] == self.seen:
            return self._kv[2]
        B, H, _, D = self.keys.shape
        P, read = self.prefix, self.read
        b_heads = self.lr_b.view(B, -1, H, D)
        if read is None:
            kp = torch.einsum("bpr,brhd->bhpd", self.lr_a, b_heads)
            values = self.values.to(self.device)
        else:
            kp = torch.zeros(B, H, P, D, dtype=self.dtype, device=self.device)
            rebuild = read[:, :, :P] & ~self.outlier_rows()  # outlier rows are exact already
            for b in range(B):
                for h in range(H):
                    rows = rebuild[b, h].nonzero().flatten()
                    kp[b, h, rows] = self.lr_a[b, rows] @ b_heads[b, :, h]
            values = torch.zeros(self.values.shape, dtype=self.dtype, device=self.device)
            rows = read.to(self.values.device)
            values[read] = self.values[rows].to(self.device)
        kp[self.outlier_rows()] = self.out_k.flatten(0, 2)
        out = torch.cat([kp, self.keys.to(self.device)], 2), values
        self._kv = (read, self.seen, out)
        return out

    def tensors(self) -> list[Tensor]:
        extra = [self.lr_a, self.lr_b, self.landmarks, self.out_chunks, self.out_k]
        return super().tensors() + [t for t in extra if t is not None]


@register("shadowkv", "decode", paper="ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference "
                                      "(2024)")
class ShadowKV(DecodePolicy):
    """Read ``budget`` tokens of the prompt per kv head (top chunks by landmark score), plus its outlier chunks,
    its local tail and every later token; the prompt's other keys live only as rank-``rank`` factors."""

    budget_is_cap = True  # a read budget: at or above the prompt, the prompt is kept exact

    def __init__(self, budget: int = 2048, chunk_size: int = 8, rank: int = 160, outlier_chunk: int = 48,
                 local_chunk: int = 4):
        super().__init__(budget)
        if budget is None:
            raise TypeError("budget: expected an int (prompt tokens read per step), got None")
        check_int("chunk_size", chunk_size)
        check_int("rank", rank)
        check_int("outlier_chunk", outlier_chunk, minimum=0)
        check_int("local_chunk", local_chunk, minimum=0)
        if budget % chunk_size:
            raise ValueError(f"chunk_size: {chunk_size} does not divide budget={budget}; the budget is read in "
                             f"whole chunks, pass a budget that is a multiple of chunk_size")
        self.chunk_size, self.rank, self.outlier_chunk, self.local_chunk = chunk_size, rank, outlier_chunk, local_chunk

    def bind(self, config):
        super().bind(config)
        heads = int(config.num_key_value_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        if self.rank > heads * head_dim:
            raise ValueError(f"rank: {self.rank} exceeds the key width of a layer (num_key_value_heads x head_dim "
                             f"= {heads} x {head_dim} = {heads * head_dim}); pass rank <= {heads * head_dim}")

    def make_layer(self, layer_idx, offload=None):
        return ShadowLayer(offload=offload or "values")  # the value cache always lives in CPU memory

    def apply_compress(self, layer_idx, layer):
        if self.budget < int(layer.lengths.max()):
            layer.to_shadow(self.chunk_size, self.rank, self.outlier_chunk, self.local_chunk)
        layer.queries = None
        layer.compressed = True

    def select(self, layer_idx, q, layer):
        layer.read = None
        if q.shape[2] != 1 or not layer.shadow:
            return None
        B, Hq, _, D = q.shape
        Hkv = layer.landmarks.shape[1]
        s = q.float().view(B, Hkv, Hq // Hkv, D) @ layer.landmarks.float().transpose(-1, -2) / D ** 0.5
        layer.note_scoring(B * Hkv * layer.landmarks.shape[2] / 2)  # one landmark key per chunk: half a slot
        votes = torch.softmax(s, -1).sum(2)  # [B, Hkv, nc]
        chunks = topk_mask(votes, self.budget // self.chunk_size, ~layer.out_chunks)
        rows = (chunks | layer.out_chunks).repeat_interleave(self.chunk_size, -1)
        tail = torch.ones(B, Hkv, layer.capacity - layer.prefix, dtype=torch.bool, device=layer.device)
        layer.read = torch.cat([rows, tail], -1) & layer.valid()
        return layer.read

    def after_step(self, layer_idx, q, layer):
        layer.read, layer._kv = None, None
