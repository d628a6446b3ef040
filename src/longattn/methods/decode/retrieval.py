"""RetrievalAttention (Liu et al., 2024): attention as vector retrieval. The ``n_sink`` first and ``n_recent`` newest
tokens are static and always read (the GPU side); the keys in between go into an approximate-nearest-neighbour
index in CPU memory, one per (batch, kv head), and at every decoding step each query head searches its kv head's
index for the ``top_k`` keys of largest inner product with the query (the largest attention logits); the step
reads the static tokens plus the union of the retrieved ones over the GQA group. Tokens that slide out of the
recent window while decoding are added to the index.

The index is faiss (``pip install 'longattn[ann]'``): HNSW over inner products by default, or an exact flat
inner-product index (``index="flat"``). The paper builds its own attention-aware graph index (RoarGraph) from the
prefill queries, which copes better with queries that lie out of the keys' distribution; a stock faiss HNSW does
not use the queries at build time, so its recall at a given ``ef_search`` is lower than the paper's index.
Nothing is evicted; pass ``offload="all"`` to the cache to hold the middle K/V in CPU memory as the paper does.

Defaults are the paper's: 128 initial + 512 recent static tokens, 100 retrieved tokens per query head."""

from __future__ import annotations

import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.base import DecodePolicy, check_int
from longattn.methods.registry import register

INDEXES = ("hnsw", "flat")


def import_faiss():
    """faiss, imported on first use; a clear error naming the extra when it is missing."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("retrieval: RetrievalAttention needs the faiss ANN library; install the 'ann' extra: "
                          "pip install 'longattn[ann]' (or pip install faiss-cpu)") from e
    return faiss


@register("retrieval", "decode", paper="RetrievalAttention: Accelerating Long-Context LLM Inference via Vector "
                                       "Retrieval (2024)")
class RetrievalAttention(DecodePolicy):
    """Read ``n_sink`` + ``n_recent`` static tokens + the ``top_k`` keys retrieved per query head from a CPU ANN
    index over the rest (HNSW with ``hnsw_m`` links and ``ef_search`` candidates, or exact ``flat``)."""

    def __init__(self, n_sink: int = 128, n_recent: int = 512, top_k: int = 100, index: str = "hnsw",
                 hnsw_m: int = 32, ef_search: int = 128):
        super().__init__(None)
        check_int("n_sink", n_sink, minimum=0)
        check_int("n_recent", n_recent)
        check_int("top_k", top_k)
        check_int("hnsw_m", hnsw_m, minimum=2)
        check_int("ef_search", ef_search)
        if index not in INDEXES:
            raise ValueError(f"index: expected one of {INDEXES}, got {index!r}")
        if index == "hnsw" and ef_search < top_k:
            raise ValueError(f"ef_search: {ef_search} candidates cannot return top_k={top_k} neighbours; expected "
                             f"ef_search >= top_k")
        self.faiss = import_faiss()
        self.n_sink, self.n_recent, self.top_k = n_sink, n_recent, top_k
        self.index, self.hnsw_m, self.ef_search = index, hnsw_m, ef_search

    def _new_index(self, d: int):
        if self.index == "flat":
            return self.faiss.IndexFlatIP(d)
        idx = self.faiss.IndexHNSWFlat(d, self.hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = self.ef_search
        return idx

    def apply_compress(self, layer_idx, layer):
        B, H, _, D = layer.keys.shape
        layer.retrieval = {"indexes": [[self._new_index(D) for _ in range(H)] for _ in range(B)],
                           "hi": self.n_sink}  # slots [n_sink, hi) are in the index (slot = position)
        self.grow(layer)
        layer.queries, layer.compressed = None, True

    def grow(self, layer: LongattnLayer) -> None:
        """Move the tokens that left the recent window into the index."""
        state = layer.retrieval
        lo, hi = state["hi"], layer.seen - self.n_recent
        if hi <= lo:
            return
        keys = layer.keys[:, :, lo:hi].detach().to("cpu", torch.float32).numpy()
        for b, row in enumerate(state["indexes"]):
            for h, index in enumerate(row):
                index.add(keys[b, h].copy())  # ids are insertion order: id i = slot lo_0 + i
        state["hi"] = hi

    def select(self, layer_idx, q, layer):
        state = getattr(layer, "retrieval", None)
        if q.shape[2] != 1 or state is None:
            return None
        self.grow(layer)
        B, Hq, _, D = q.shape
        H, cap = layer.keys.shape[1], layer.capacity
        g = Hq // H
        slot = torch.arange(cap, device=layer.device)
        chosen = ((slot < self.n_sink) | (slot >= state["hi"])).expand(B, H, cap).clone()
        n_index = state["hi"] - self.n_sink
        if n_index <= self.top_k:
            return None  # every indexed token would be retrieved: the whole cache
        qs = q.detach().to("cpu", torch.float32).view(B, H, g, D).numpy()
        for b, row in enumerate(state["indexes"]):
            for h, index in enumerate(row):
                _, ids = index.search(qs[b, h].copy(), self.top_k)
                ids = torch.from_numpy(ids[ids >= 0]).to(layer.device) + self.n_sink
                chosen[b, h, ids] = True
        return chosen & layer.valid()
