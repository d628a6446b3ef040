"""MInference per-head pattern search and the ``minference`` dispatcher: planted heads get their pattern, the
mixed-head BlockSparse equals each head's own pattern, configs round-trip through JSON, oracle rule, errors."""

from __future__ import annotations

import json

import pytest
import torch

from longattn.kernels.block_sparse import BlockSparseAttention
from longattn.methods.prefill import minference_search as ms
from longattn.methods.prefill.minference_search import MInference
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    check_density,
    check_keeps_everything,
    check_oracle,
    qkv,
)
from tests.oracle import check_against_oracle

ASHAPE = {"pattern": "ashape", "knobs": {"n_init": 16, "n_local": 256}}
VS = {"pattern": "vertical_slash", "knobs": {"vertical_size": 40, "slash_size": 100}}
BLOCK = {"pattern": "block", "knobs": {"top_k": 1}}
CANDIDATES = [ASHAPE, VS, BLOCK]


def _config(specs: list[dict], layer: str = "0") -> dict:
    return {"format": ms.FORMAT, "model": "", "block": 64, "last_q": 64, "layers": {layer: specs}}


def planted_heads(S: int = 768, D: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, 3, S, D]: head 0 attends locally (smooth decay over ~150 tokens), head 1 to ten scattered key
    columns, head 2 from query block b to the far key block b - 6 (64-token blocks)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, S, D, generator=g) * 0.3, torch.randn(1, 3, S, D, generator=g) * 0.3
    pos = torch.arange(S).float().view(-1, 1)
    freq = torch.linspace(0.001, 0.012, D // 2).view(1, -1)
    rot = torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)
    q[0, 0] += 1.5 * rot
    k[0, 0] += rot
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q[0, 1] += 3 * u
    k[0, 1, [40, 61, 90, 133, 177, 230, 290, 377, 499, 610]] = 16 * u
    for b in range(7, S // 64):
        w = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
        q[0, 2, b * 64:(b + 1) * 64] += 8 * w
        k[0, 2, (b - 6) * 64:(b - 5) * 64] += 8 * w
    return q, k


def test_search_picks_the_planted_pattern_per_head():
    q, k = planted_heads()
    heads = ms.search_layer(q, k, CANDIDATES)
    assert [h["pattern"] for h in heads] == ["ashape", "vertical_slash", "block"], heads
    assert all(0 < h["recall"] <= 1 + 1e-9 for h in heads)


def test_mixed_heads_share_one_block_sparse_equal_to_each_heads_pattern():
    q, k, v = qkv(300, Hq=4, Hkv=2)
    small = [{"pattern": "ashape", "knobs": {"n_init": 16, "n_local": 64}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 40, "slash_size": 120}}, BLOCK]
    specs = [small[0], small[1], small[2], small[0]]
    cfg = {"format": ms.FORMAT, "model": "planted", "block": 64, "last_q": 64, "layers": {"3": specs}}
    m = MInference(cfg)
    mixed = m.estimate(q, k, layer=3)
    dense = mixed.to_dense()
    for h, spec in enumerate(specs):
        alone = MInference({**cfg, "layers": {"3": [spec] * 4}}).estimate(q, k, layer=3).to_dense()
        assert torch.equal(dense[0, h], alone[0, h]), f"head {h} ({spec['pattern']})"
    check_density(mixed, m.last_density)
    check_oracle(mixed, q, k, v)


def test_config_round_trips_through_json(tmp_path):
    q, k = planted_heads()
    cfg = ms.search([(1, q.flip(1), k.flip(1))], candidates=CANDIDATES, model_name="planted")
    path = tmp_path / "minference.json"
    ms.save_config(cfg, path)
    assert json.loads(path.read_text()) == cfg
    loaded = ms.load_config(path)
    assert [h["pattern"] for h in loaded["layers"]["1"]] == ["block", "vertical_slash", "ashape"]
    a, b = MInference(path).estimate(q, k, layer=1), MInference(cfg).estimate(q, k, layer=1)
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
def test_oracle_rule_and_density_with_default_patterns(Sq, Skv, Hkv, dtype, D):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    specs = [{"pattern": "ashape", "knobs": {"n_init": 8, "n_local": 40}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 35, "slash_size": 110}},
             {"pattern": "block", "knobs": {"top_k": 2}}, {"pattern": "block", "knobs": {"top_k": 1}}]
    m = MInference(_config(specs))
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


def test_triton_kernel_on_mixed_token_level_heads_matches_the_oracle():
    q, k, v = qkv(200, Hkv=2, dtype=torch.float16)
    specs = [{"pattern": "ashape", "knobs": {"n_init": 5, "n_local": 37}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 33, "slash_size": 105}}, BLOCK, BLOCK]
    bs = MInference(_config(specs)).estimate(q, k)
    assert bs.tiles.shape[0] > 2  # token-level partial blocks reach the kernel as bit tiles

    def run(q, k, v, bias):
        return BlockSparseAttention.apply(q, k, v, None, None, bs, q.shape[-1] ** -0.5)

    check_against_oracle(run, q, k, v, mask=bs)


def test_whole_context_budgets_are_dense():
    q, k, v = qkv(300)
    specs = [{"pattern": "ashape", "knobs": {"n_init": 0, "n_local": 300}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 300, "slash_size": 300}},
             {"pattern": "block", "knobs": {"top_k": 5}}, {"pattern": "block", "knobs": {"top_k": 5}}]
    bs = MInference(_config(specs)).estimate(q, k)
    check_keeps_everything(bs, q, k, v)


def test_bad_input(tmp_path):
    q, k, _ = qkv(300)
    assert get("minference").factory is MInference
    with pytest.raises(ValueError, match="vertical_size: budget of 1000 tokens exceeds the context of 300"):
        MInference().estimate(q, k)  # no config: MInference's default vertical-slash budgets
    base = {"format": ms.FORMAT, "model": "", "block": 64, "last_q": 64}
    with pytest.raises(ValueError, match="top_k: budget of 6 kv blocks exceeds the context of 5 kv blocks"):
        MInference({**base, "layers": {"0": [{"pattern": "block", "knobs": {"top_k": 6}}] * 4}}).estimate(q, k)
    with pytest.raises(ValueError, match="config: layer 0 lists 1 heads, the model has 4"):
        MInference({**base, "layers": {"0": [BLOCK]}}).estimate(q, k)
    with pytest.raises(ValueError, match="config layer 0 head 0: expected"):
        MInference({**base, "layers": {"0": [{"pattern": "dense", "knobs": {}}]}})
    with pytest.raises(ValueError, match="vertical_slash expects int knobs"):
        MInference({**base, "layers": {"0": [{"pattern": "vertical_slash", "knobs": {"top_k": 3}}]}})
    with pytest.raises(ValueError, match="config: expected a longattn-minference-v1"):
        MInference({"layers": {}})
    with pytest.raises(ValueError, match="candidates: expected at least one"):
        ms.search_layer(q, k, [])
