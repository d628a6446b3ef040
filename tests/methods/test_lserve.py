"""LServe prefill: oracle rule on its sparsity, reported density, dense with no streaming heads, head typing by
score and by config, errors."""

from __future__ import annotations

import json

import pytest
import torch

from longattn.methods.prefill.lserve import LServePrefill
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, causal_dense, check_keeps_everything, check_standard, qkv


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
@pytest.mark.parametrize("top_k", [None, 2])
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype, top_k):
    method = LServePrefill(num_sinks=16, window=40, top_k=top_k, block=32)
    check_standard(method, Sq, Skv, Hq, Hkv, D, dtype)
    assert int(method.last_streaming.sum()) == 2


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (130, 300)])
def test_no_streaming_heads_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(LServePrefill(streaming_ratio=0.0, block=32, num_sinks=4, window=8).estimate(q, k), q, k, v)
    method = LServePrefill(streaming_heads={0: []}, block=32, num_sinks=4, window=8)
    check_keeps_everything(method.estimate(q, k), q, k, v)


def test_streaming_heads_keep_exactly_sinks_and_window(tmp_path):
    S = 200
    q, k, _ = qkv(S)
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"3": [0, 2]}))
    allowed = LServePrefill(streaming_heads=path, num_sinks=5, window=17, block=32).estimate(q, k, layer=3)
    allowed = allowed.to_dense()[0]
    d = torch.arange(S).view(-1, 1) - torch.arange(S).view(1, -1)
    lam = causal_dense(S, S) & ((torch.arange(S).view(1, -1) < 5) | (d < 17))
    assert torch.equal(allowed[0], lam) and torch.equal(allowed[2], lam)
    assert torch.equal(allowed[1], causal_dense(S, S)) and torch.equal(allowed[3], causal_dense(S, S))


def test_score_picks_the_local_head():
    S = 512
    q, k, _ = qkv(S, Hq=4, Hkv=4)
    k[:, 1] = q[:, 1] * 4  # head 1: each query matches its own key, attention is local
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    for h in (0, 2, 3):  # the others look at a block in the middle
        q[:, h] += 3 * u
        k[:, h, 200:260] += 3 * u
    method = LServePrefill(streaming_ratio=0.25, num_sinks=64, window=64, block=64)
    method.estimate(q, k)
    assert method.last_streaming.tolist() == [False, True, False, False]


def test_registered_and_bad_input():
    assert get("lserve").factory is LServePrefill
    for kwargs, match in [({"streaming_ratio": 1.5}, r"streaming_ratio: expected a number in \[0, 1\]"),
                          ({"window": 0}, "window: expected an int >= 1"),
                          ({"top_k": 0}, "top_k: expected an int >= 1"),
                          ({"streaming_heads": {"a": [1]}}, "streaming_heads: expected {layer: "),
                          ({"block": 48}, "block: expected a power of two")]:
        with pytest.raises(ValueError, match=match):
            LServePrefill(**kwargs)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match=r"window: budget of 256 tokens exceeds the context of 100 tokens"):
        LServePrefill().estimate(q, k)
    with pytest.raises(ValueError, match=r"top_k: budget of 9 kv blocks exceeds the context of 4 kv blocks"):
        LServePrefill(window=8, top_k=9, block=32).estimate(q, k)
    with pytest.raises(ValueError, match=r"streaming_heads: layer 0 lists heads \[7\]"):
        LServePrefill(streaming_heads={0: [7]}, window=8).estimate(q, k)
