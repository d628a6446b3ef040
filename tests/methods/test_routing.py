"""Routing Transformer: oracle rule on its sparsity, reported density, dense with one cluster, planted clusters,
errors."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.prefill.routing import RoutingAttention
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, causal_dense, check_keeps_everything, check_standard, qkv


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype):
    check_standard(RoutingAttention(block=32), Sq, Skv, Hq, Hkv, D, dtype)


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (130, 300)])
def test_one_cluster_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(RoutingAttention(n_clusters=1, block=32).estimate(q, k), q, k, v)


def test_planted_clusters_are_recovered():
    S, n = 240, 3
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=-1)
    q_dir, k_dir = torch.randint(0, n, (S,), generator=g), torch.randint(0, n, (S,), generator=g)
    q = (dirs[q_dir] + 0.05 * torch.randn(S, 32, generator=g)).view(1, 1, S, 32)
    k = (dirs[k_dir] + 0.05 * torch.randn(S, 32, generator=g)).view(1, 1, S, 32)
    same = (q_dir.view(-1, 1) == k_dir.view(1, -1)) | torch.eye(S, dtype=torch.bool)
    for cluster_on in ("keys", "both"):
        bs = RoutingAttention(n_clusters=n, iters=5, cluster_on=cluster_on, block=32).estimate(q, k)
        assert torch.equal(bs.to_dense()[0, 0], same & causal_dense(S, S))


def test_separate_query_and_key_regions():
    """Queries and keys in different regions (as in models trained without routing): clustered together they never
    meet, so only the own key is kept; key-fitted centroids route each query to the keys along its direction."""
    S, n = 240, 3
    g = torch.Generator().manual_seed(1)
    dirs = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=-1)
    shift = torch.zeros(32)
    shift[0] = 4.0  # queries far from every key
    q_dir, k_dir = torch.randint(0, n, (S,), generator=g), torch.randint(0, n, (S,), generator=g)
    q = (dirs[q_dir] + 0.05 * torch.randn(S, 32, generator=g) + shift).view(1, 1, S, 32)
    k = (dirs[k_dir] + 0.05 * torch.randn(S, 32, generator=g) - shift).view(1, 1, S, 32)
    both = RoutingAttention(n_clusters=n, iters=5, cluster_on="both", block=32).estimate(q, k).to_dense()[0, 0]
    keys = RoutingAttention(n_clusters=n, iters=5, cluster_on="keys", block=32).estimate(q, k).to_dense()[0, 0]
    assert int(both.sum()) < 2 * S  # (nearly) only the diagonal
    assert int(keys.sum()) > 10 * S


def test_registered_and_bad_input():
    assert get("routing").factory is RoutingAttention
    for kwargs, match in [({"n_clusters": 0}, "n_clusters: expected an int >= 1"),
                          ({"iters": -1}, "iters: expected an int >= 0"),
                          ({"local_window": 0}, "local_window: expected an int >= 1"),
                          ({"cluster_on": "queries"}, "cluster_on: expected 'keys' or 'both'"),
                          ({"block": 20}, "block: expected a power of two")]:
        with pytest.raises(ValueError, match=match):
            RoutingAttention(**kwargs)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match=r"n_clusters: budget of 101 keys exceeds the context of 100 keys"):
        RoutingAttention(n_clusters=101).estimate(q, k)
    with pytest.raises(ValueError, match=r"local_window: budget of 200 tokens exceeds"):
        RoutingAttention(local_window=200).estimate(q, k)
