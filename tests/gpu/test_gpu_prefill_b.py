"""Part-B prefill methods at GPU sizes: the Triton kernel on each method's BlockSparse against the fp64 oracle of
the same sparsity, with the estimate's time printed (skipped without CUDA)."""

from __future__ import annotations

import time

import pytest
import torch

from longattn.kernels.block_sparse import BlockSparseAttention
from longattn.methods.prefill.anchor import AnchorAttention
from longattn.methods.prefill.dhsa import DHSA
from longattn.methods.prefill.hyper import HyperAttention
from longattn.methods.prefill.lserve import LServePrefill
from longattn.methods.prefill.moa import MoA, MoAConfig
from longattn.methods.prefill.routing import RoutingAttention
from tests.methods.prefill_checks import check_method_density
from tests.oracle import check_against_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

METHODS = {
    "anchor": lambda H: AnchorAttention(),
    "dhsa": lambda H: DHSA(budget=1024),
    "hyper": lambda H: HyperAttention(min_seq_len=1024),  # 4097 keys: approximate off-diagonal pieces
    "routing": lambda H: RoutingAttention(),
    "lserve": lambda H: LServePrefill(top_k=16),
    "moa": lambda H: MoA(MoAConfig({0: [(256.0, 0.1 * (h % 4)) for h in range(H)]})),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D"), [(4097, 4097, 8, 2, 128), (1000, 3000, 8, 8, 64)])
def test_method_on_the_triton_kernel(name, dtype, Sq, Skv, Hq, Hkv, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Hq, Sq, D, device="cuda", generator=g, dtype=dtype)
    k, v = (torch.randn(1, Hkv, Skv, D, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    method = METHODS[name](Hq)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bs = method.estimate(q, k)
    torch.cuda.synchronize()
    print(f"{name} {Sq}x{Skv}: estimate {1e3 * (time.perf_counter() - t0):.1f} ms, density {bs.density():.3f}")
    check_method_density(method, bs)

    def run(q, k, v, bias):
        return BlockSparseAttention.apply(q, k, v, None, None, bs, q.shape[-1] ** -0.5)

    check_against_oracle(run, q, k, v, mask=bs)
