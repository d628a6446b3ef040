"""Attention fidelity against a naive full-matrix computation, and chunked perplexity against full logits."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn import masks  # noqa: E402
from longattn.eval.fidelity import head_fidelity, measure  # noqa: E402
from longattn.eval.methods import parse_method  # noqa: E402
from longattn.eval.perplexity import perplexity  # noqa: E402
from longattn.kernels.reference import reference_attention  # noqa: E402
from longattn.masks.block_sparse import BlockSparse  # noqa: E402


@pytest.mark.parametrize("Sq,Skv", [(300, 300), (77, 200)])
def test_head_fidelity_matches_the_full_matrix(Sq, Skv):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, Sq, 16), torch.randn(1, 2, Skv, 16), torch.randn(1, 2, Skv, 16)
    bs = BlockSparse.from_mask_mod(masks.sinks(3, 40, offset=Skv - Sq), 1, 4, Sq, Skv, (32, 32))
    sparse, _ = reference_attention(q, k, v, mask=bs, scale=0.25)
    recall, err = head_fidelity(q, k, v, bs, sparse, 0.25, chunk_blocks=2)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(
        torch.arange(Skv) > torch.arange(Sq).view(-1, 1) + Skv - Sq, float("-inf"))
    p = s.softmax(-1)[0]
    kept = bs.to_dense()[0].expand(4, -1, -1)
    torch.testing.assert_close(recall.float(), (p * kept).sum(-1).mean(-1), rtol=1e-5, atol=1e-6)
    dense = (p @ vv[0])
    want = ((sparse[0] - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2)))
    torch.testing.assert_close(err.float(), want, rtol=1e-4, atol=1e-6)
    assert (recall < 1).all()


def test_measure_on_a_model(model):
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    full = measure(model, ids, parse_method("streaming:num_sinks=4:window=512"))
    assert len(full) == 2 * 4  # layers × query heads
    assert all(abs(r["mass_recall"] - 1) < 1e-6 and r["out_rel_err"] < 1e-5 and r["density"] == 1 for r in full)
    narrow = measure(model, ids, parse_method("streaming:num_sinks=4:window=32"))
    assert all(r["mass_recall"] < 0.99 and r["out_rel_err"] > 1e-3 and r["density"] < 0.3 for r in narrow)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_chunked_perplexity_equals_full_logits(model):
    ids = torch.randint(0, 256, (1, 333), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    want = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert abs(perplexity(model, ids, chunk=100) - want) < 1e-4 * want
