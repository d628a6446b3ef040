"""Linear layers on CUDA: the parallel form in fp32 and fp16 at a longer length against the fp64 recurrence
(oracle rule: the baseline is the same recurrence in the low precision), plus the MQAR quick run on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.methods.linear.test_layers import CONFIGS, make, recurrent
from tests.oracle import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parallel_on_cuda_matches_the_fp64_recurrence(name, dtype):
    layer = make(name).cuda()
    x = torch.randn(2, 1000, 32, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref, _ = recurrent(layer, x)
        low = copy.deepcopy(layer).to(dtype)
        base, _ = recurrent(low, x.to(dtype))
        fast = low(x.to(dtype))
    assert_close_to_reference(fast, ref, base, what=f"{name} {dtype}")


def test_mqar_quick_trains_on_cuda(tmp_path):
    from longattn.eval.recall import RecallConfig, train

    row = train(RecallConfig("softmax", {"n_heads": 2}, seq_len=64, steps=300), device="cuda")
    assert row["accuracy"] > 0.5 and row["final_loss"] < row["first_loss"], row
