"""Squeezed Attention: offline k-means over the fixed context's keys, two-level centroid lookup per query."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.squeezed import SqueezedAttention, kmeans, nearest, take_until
from tests.methods.decode.helpers import (
    assert_dense_equivalent,
    assert_listed,
    assert_padded_dense_equivalent,
    greedy,
    prompt,
    tiny_llama,
)


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("squeezed", {"budget": 40, "fine_ratio": 0.25, "coarse_ratio": 0.1})
    assert_padded_dense_equivalent("squeezed", {"budget": 40, "fine_ratio": 0.25, "coarse_ratio": 0.1})


def _four_blobs() -> LongattnLayer:
    """12 keys in four tight clusters of 3 (slots 0-2 at +x, 3-5 at +y, 6-8 at -x, 9-11 at -y), then 2 tokens
    after the fixed context."""
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]])
    jitter = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, -0.1]])
    k = (centres[:, None] + jitter[None]).reshape(1, 1, 12, 2)
    layer = LongattnLayer()
    layer.update(k, k)
    return layer


def test_clusters_and_two_level_lookup_hand_worked():
    """Fine k-means (4 clusters, initialised on slots 0, 4, 7, 11) finds the four blobs; coarse k-means over them
    (2 clusters, initialised on blobs +x and -y) groups {+x, +y} and {-x, -y}. A query along (1, 0.5) prefers the
    first coarse cluster (it holds 6 >= 2 x budget tokens: the only one explored), inside it the +x blob: with a
    budget of 3 it reads slots 0-2 plus the tokens after the fixed context."""
    layer = _four_blobs()
    policy = SqueezedAttention(budget=3, fine_ratio=4 / 12, coarse_ratio=2 / 12, coarse_factor=2.0)
    policy.apply_compress(0, layer)
    sq = layer.squeezed
    assert sq["assign"][0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sq["fine_size"][0, 0].tolist() == [3.0] * 4 and sq["parent"][0, 0].tolist() == [0, 0, 1, 1]
    assert torch.allclose(sq["coarse"][0, 0], torch.tensor([[5.0, 5.0], [-5.0, -5.0]]), atol=0.1)
    layer.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    sel = policy.select(0, torch.tensor([[[[1.0, 0.5]]]]), layer)
    assert sel[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 12, 13]
    assert layer.scored_slots == 3.0  # 2 coarse + 4 fine centroid keys scored: half a slot each
    sel = policy.select(0, torch.tensor([[[[-0.5, -1.0]]]]), layer)  # the -y blob, in the other coarse cluster
    assert sel[0, 0].nonzero().flatten().tolist() == [9, 10, 11, 12, 13]


def test_kmeans_and_take_until():
    x = torch.tensor([[[0.0], [0.2], [5.0], [5.2], [9.0]]])
    c, a = kmeans(x, 2, 5)
    assert a.tolist() == [[0, 0, 1, 1, 1]] and torch.allclose(c, torch.tensor([[[0.1], [6.4]]]))
    assert torch.equal(nearest(x, c, chunk=2), a)  # chunked assignment = one pass
    mass, size = torch.tensor([0.1, 0.5, 0.3, 0.1]), torch.tensor([4.0, 2.0, 3.0, 1.0])
    assert take_until(mass, size, 4).tolist() == [False, True, True, False]  # 2 tokens < 4, then 5 >= 4
    assert take_until(mass, size, 4, torch.tensor([True, False, True, True])).tolist() == [True, False, True, False]


def test_generation_reads_about_the_budget():
    model = tiny_llama()
    handle = longattn.patch(model, decode="squeezed", impl="reference",
                            decode_config={"budget": 12, "fine_ratio": 0.2, "coarse_ratio": 0.05})
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
        layer = cache.layers[1]
        sel = handle.state.policy.select(1, torch.randn(1, 4, 1, 16), layer)
        fixed = sel[..., :40].sum(-1)
        assert bool((fixed >= 12).all()) and bool((fixed < 40).all()) and bool(sel[..., 40:43].all())
        assert int(layer.lengths.max()) == 43  # nothing evicted
    finally:
        handle.restore()


def test_errors():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got -1"):
        SqueezedAttention(budget=-1)
    with pytest.raises(ValueError, match="coarse_ratio: 0.1 coarse clusters per token exceed fine_ratio=0.05"):
        SqueezedAttention(coarse_ratio=0.1)
    with pytest.raises(ValueError, match="fine_ratio, coarse_ratio: expected > 0"):
        SqueezedAttention(fine_ratio=0.0)
    with pytest.raises(ValueError, match="fine_ratio: expected a number in"):
        SqueezedAttention(fine_ratio=2.0)
    with pytest.raises(ValueError, match="coarse_factor: expected a number >= 1"):
        SqueezedAttention(coarse_factor=0.5)


def test_listed(capsys):
    assert_listed("squeezed", "Squeezed Attention", capsys)
