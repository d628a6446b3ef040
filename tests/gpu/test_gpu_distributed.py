"""Context-parallel attention on a GPU with a one-rank NCCL group (the machine lends one GPU): every partial
attention, merge and backward of the ring, Ulysses and linear state passing in bf16/fp16 on the Triton kernels,
against the fp64 oracle under the suite's tolerance rule; multi-rank exchanges are tested on gloo
(tests/distributed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn import masks
from longattn.distributed import linear_attention_cp, ring_attention, ulysses_attention
from longattn.kernels.linear_reference import linear_attention_recurrent
from tests.oracle import assert_close_to_reference, check_against_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def nccl_group_of_one(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _qkv(dtype, S=1000):
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(1, h, S, 128, device="cuda", dtype=dtype, generator=g) for h in (8, 2, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["causal", "window", "full"])
def test_ring_on_the_gpu(nccl_group_of_one, case, dtype):
    mask = masks.sliding_window(300) if case == "window" else None
    causal = case == "causal"

    def run(q, k, v, bias):
        return ring_attention(q, k, v, mask=mask, causal=causal, return_lse=True)

    check_against_oracle(run, *_qkv(dtype), mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulysses_on_the_gpu(nccl_group_of_one, dtype):
    mask = masks.per_head_window([16, 64, 256, 1000, 16, 64, 256, 1000])

    def run(q, k, v, bias):
        return ulysses_attention(q, k, v, mask=mask, return_lse=True)

    check_against_oracle(run, *_qkv(dtype), mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_state_passing_on_the_gpu(nccl_group_of_one, dtype):
    q, k, v = (t[:, :2] / 4 for t in _qkv(dtype))
    decay = torch.tensor([0.99, 0.9], device="cuda")
    out, state = linear_attention_cp(q, k, v, decay=decay, output_final_state=True)
    log_g = torch.log(decay)[None, :, None].expand(1, 2, q.shape[2])
    (ref_o, ref_s), (low_o, low_s) = (
        linear_attention_recurrent(q.to(dt), k.to(dt), v.to(dt), log_g.to(dt), scale=128 ** -0.5, state_dtype=dt)
        for dt in (torch.float64, dtype))
    assert_close_to_reference(out, ref_o, low_o, what="out")
    assert_close_to_reference(state, ref_s, low_s, what="state")
