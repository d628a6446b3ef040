"""Every dynamic prefill method at GPU sizes with its paper defaults: the Triton kernel on the estimated
BlockSparse matches the oracle (forward and backward), and the estimate stays far below O(S^2) memory."""

from __future__ import annotations

import time

import pytest
import torch

from longattn.methods.registry import get
from tests.kernels.test_block_sparse_kernel import _inputs, _run_block_sparse
from tests.methods.prefill_checks import check_density
from tests.oracle import check_against_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

METHODS = {
    "minference_ashape": {},
    "minference_vertical_slash": {},
    "minference_vertical_slash_tokens": {"token_level": True, "vertical_size": 300, "slash_size": 900},
    "minference": {},
    "flexprefill": {},
    "hip": {},
    "seer": {},
    "seer_learned": {},
}


def _method(name: str):
    base = name.removesuffix("_tokens")
    return get(base).factory(**METHODS[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("shape", [(8192, 128, 8, 2), (7001, 64, 8, 8)],
                         ids=lambda s: f"s{s[0]}-d{s[1]}-h{s[2]}/{s[3]}")
def test_gpu_method_matches_oracle(shape, name, dtype):
    S, D, Hq, Hkv = shape
    q, k, v = _inputs(1, Hq, Hkv, S, S, D, dtype)
    m = _method(name)
    bs = m.estimate(q, k)
    assert bs.device.type == "cuda"
    check_density(bs, m.last_density)
    # gathered columns (vertical-slash heads) run forward only: prefill
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=bs, backward=bs.columns is None)


@pytest.mark.parametrize("name", [n for n in METHODS if not n.endswith("_tokens")])  # forced token tiles grow
def test_gpu_estimate_memory_and_time_at_64k(name):
    S, D, Hq, Hkv = 65536, 128, 8, 2
    q, k, _ = _inputs(1, Hq, Hkv, S, S, D, torch.bfloat16)
    m = _method(name)
    m.estimate(q, k)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    bs = m.estimate(q, k)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated() - base
    one_score_map = S * S * 4  # a single fp32 [S, S] map of one head
    print(f"{name}: estimate {ms:.1f} ms, peak {peak / 2**20:.0f} MiB, density {bs.density():.3f}")
    assert peak < one_score_map / 4, f"{name}: estimate peak {peak / 2**20:.0f} MiB looks O(S^2)"


def test_gpu_seer_gate_distillation_runs_on_the_device(tmp_path):
    from longattn.methods.prefill.seer_learned import SeerLearned, distill

    q, k, v = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16)
    gates = distill([(0, q, k)], steps=5, lr=1e-2, path=tmp_path / "g.safetensors")
    assert gates.history[-1] < gates.history[0]
    m = SeerLearned(tmp_path / "g.safetensors", threshold=1e-3)
    bs = m.estimate(q, k)
    check_density(bs, m.last_density)
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=bs)
