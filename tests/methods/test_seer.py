"""Training-free SeerAttention gate: planted hot block, threshold vs top-k, oracle rule, density, dense at
threshold 0, bad knobs."""

from __future__ import annotations

import pytest
import torch

from longattn.masks.block_sparse import EMPTY
from longattn.methods.prefill.seer import SeerAttention, pooled_keys
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    check_density,
    check_keeps_everything,
    check_oracle,
    qkv,
)


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
@pytest.mark.parametrize("knobs", [{"threshold": 0.02}, pytest.param({"top_k": 2}, marks=pytest.mark.slow)],
                         ids=["threshold", "top_k"])
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D, knobs):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = SeerAttention(**knobs)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


def test_planted_hot_block_is_selected_by_every_later_query_block():
    S, D = 640, 32
    q, k, _ = qkv(S, Hq=2, Hkv=1, D=D)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(2)), dim=0)
    q += 2 * u
    k[:, :, 200] += 12 * u  # one hot key inside block 3: max pooling keeps it visible, mean pooling would dilute it
    cls_map = SeerAttention(top_k=1).estimate(q, k).block_map()[0]
    assert (cls_map[0, :, 4:, 3] != EMPTY).all()
    assert int((cls_map[0, :, 4:] != EMPTY).sum(-1).max()) == 2  # the hot block and the diagonal block


def test_pooled_keys_ignore_the_padding_of_the_last_block():
    k = torch.arange(2 * 70 * 1, dtype=torch.float32).view(1, 1, 70 * 2, 1)[:, :, :70]
    pk = pooled_keys(k, 64)
    assert pk[0, 0, 1].tolist() == [69.0, 64.0, 66.5]  # max, min, mean over the 6 valid tokens of block 1


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (1, 300), (100, 300)])
def test_threshold_zero_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(SeerAttention(threshold=0).estimate(q, k), q, k, v)


def test_bad_input():
    q, k, _ = qkv(300)
    assert get("seer").factory is SeerAttention
    for threshold in (1, -0.1, 2.0):
        with pytest.raises(ValueError, match="threshold: expected a gate probability in \\[0, 1\\)"):
            SeerAttention(threshold=threshold)
    with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
        SeerAttention(top_k=0)
    with pytest.raises(ValueError, match="top_k: budget of 6 kv blocks exceeds the context of 5 kv blocks"):
        SeerAttention(top_k=6).estimate(q, k)
    with pytest.raises(ValueError, match="block: expected a power of two >= 32"):
        SeerAttention(block=16)
