"""TidalDecode: selection layers pick positions, the layers after them reuse them."""

from __future__ import annotations

import pytest
import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.tidaldecode import TidalDecode
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("tidaldecode", {"budget": 64, "selection_layers": (1,)}, layers=3)


def test_positions_persist_hand_worked():
    policy = TidalDecode(budget=2, selection_layers=(1, 3))
    policy.num_layers = 4
    layers = []
    for i in range(4):
        k = torch.zeros(1, 2, 6, 2)
        k[0, :, 2 + (i >= 3), 0] = 9.0  # layers 0-2 point at token 2, layer 3 at token 3
        k[0, :, 5, 0] = 4.0
        layer = LongattnLayer()
        layer.update(k, k)
        layers.append(layer)
    q = torch.tensor([[[[1.0, 0.0]]] * 2])
    assert policy.select(0, q, layers[0]) is None  # before the first selection layer: dense
    assert policy.select(1, q, layers[1]) is None  # selection layer: reads all, picks {2, 5}
    assert policy.select(2, q, layers[2])[0, 0].nonzero().flatten().tolist() == [2, 5]
    assert policy.select(3, q, layers[3]) is None  # reselects: {3, 5}
    assert policy._chosen[1][0, 0].nonzero().flatten().tolist() == [3, 5]


def test_bad_selection_layers():
    with pytest.raises(ValueError, match="selection_layers: expected increasing"):
        TidalDecode(selection_layers=(3, 1))
