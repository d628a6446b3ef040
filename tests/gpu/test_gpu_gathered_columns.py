"""Gathered columns (BlockSparse.with_columns) on the GPU: the Triton forward at 4k-8k, head_dim 64/128, GQA, fp16 /
bf16 against the fp64 oracle; MInference vertical-slash at its paper defaults gathers its columns and its kept
blocks are only the slash band's."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import masks
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill.minference_vertical_slash import MInferenceVerticalSlash
from tests.kernels.test_block_sparse_kernel import _inputs
from tests.methods.prefill_checks import check_density
from tests.oracle import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _check(bs, q, k, v):
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask=bs)
    low, low_lse = reference_attention(q, k, v, mask=bs, compute_dtype=q.dtype)
    with torch.no_grad():
        out, lse = longattn.attention(q, k, v, mask=bs, impl="triton", return_lse=True)
    assert_close_to_reference(out, ref, low)
    assert_close_to_reference(lse, ref_lse, low_lse.double(), what="lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(8192, 128, 8, 2, 64), (4097, 64, 4, 4, 128), (6000, 128, 8, 8, 128)],
                         ids=lambda s: f"s{s[0]}-d{s[1]}-h{s[2]}/{s[3]}-blk{s[4]}")
def test_gpu_columns_match_oracle(shape, dtype):
    S, D, Hq, Hkv, blk = shape
    q, k, v = _inputs(1, Hq, Hkv, S, S, D, dtype)
    g = torch.Generator().manual_seed(S)
    n = -(-S // blk)
    sel = (torch.rand(1, Hq, n, n, generator=g) < 0.05) | torch.eye(n, dtype=torch.bool)  # diagonal kept
    bs = BlockSparse.from_block_mask(sel.cuda(), S, S, blk, within=masks.causal())
    bs = bs.with_columns((torch.rand(1, Hq, S, generator=g) < 0.03).cuda())
    _check(bs, q, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_minference_defaults_gather_columns(dtype):
    S = 8192
    q, k, v = _inputs(1, 8, 2, S, S, 128, dtype)
    m = MInferenceVerticalSlash()
    bs = m.estimate(q, k)
    assert bs.columns is not None and (bs.column_counts == 1000).all()
    check_density(bs, m.last_density)
    _check(bs, q, k, v)
