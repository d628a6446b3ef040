"""Linear attention on the GPU in bf16/fp16 at head dims 64/128 and lengths up to 8k: Triton chunked forward and
backward, and the decode step, against the fp64 recurrence under the oracle rule (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from longattn import linear_attention_step
from longattn.kernels.linear_reference import linear_attention_chunk, linear_attention_recurrent
from tests.kernels.test_linear import _log_decay, api_run, make_inputs, oracle_check
from tests.oracle import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(8192, 128, 128, "gate"), (4097, 64, 64, "decay"), (2000, 128, 64, "none"), (127, 64, 128, "gate")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"s{s[0]}-dk{s[1]}-dv{s[2]}-{s[3]}")
def test_gpu_chunked_matches_oracle(shape, dtype):
    """B=1, H=2: the fp64 recurrence keeps every step's state for autograd."""
    S, Dk, Dv, gating = shape
    q, k, v, gate, decay, h0 = make_inputs(1, 2, S, Dk, Dv, dtype, gating=gating, device="cuda")
    k = k * Dk ** -0.5
    oracle_check(api_run("triton", decay), q, k, v, gate, decay, h0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_varlen_matches_oracle(dtype):
    cu = torch.tensor([0, 1, 700, 700, 3001, 3100], device="cuda", dtype=torch.int32)
    q, k, v, gate, decay, h0 = make_inputs(1, 2, 3100, 128, 128, dtype, n_states=5, device="cuda")
    oracle_check(api_run("triton", cu_seqlens=cu), q, k, v, gate, decay, h0 * 0.1, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_decode_step_matches_oracle(dim, dtype):
    q, k, v, gate, _, h0 = make_inputs(8, 4, 4, dim, dim, dtype, device="cuda")
    o, s = linear_attention_step(q, k, v, h0, gate=gate, impl="triton")
    refs = [linear_attention_recurrent(q.to(dt), k.to(dt), v.to(dt), gate.to(dt), scale=dim ** -0.5,
                                       initial_state=h0, state_dtype=dt) for dt in (torch.float64, dtype)]
    assert_close_to_reference(o, refs[0][0], refs[1][0], what="out")
    assert_close_to_reference(s, refs[0][1], refs[1][1], what="state")


@pytest.mark.parametrize("gating", ["gate", "decay"])
def test_gpu_whole_sequences_match_oracle(monkeypatch, gating):
    """The shapes above are cut into segments (few rows); here every sequence runs whole, as at large batch."""
    from longattn.kernels import linear_triton as lt

    monkeypatch.setattr(lt, "TARGET_ROWS", 1)
    q, k, v, gate, decay, h0 = make_inputs(1, 2, 3000, 128, 128, torch.bfloat16, gating=gating, device="cuda")
    oracle_check(api_run("triton", decay), q, k * 128 ** -0.5, v, gate, decay, h0)


@pytest.mark.parametrize("cut", ["segments", "pieces", "whole"])
@pytest.mark.parametrize("gating", ["gate", "decay", "none"])
def test_gpu_long_matches_chunked_oracle(monkeypatch, gating, cut):
    """16k tokens, bf16, d=128, forward and every gradient: the fp64 chunked form is the oracle (the recurrence
    is exact too but far too slow here) and the chunked form computing in bf16 the baseline. Four rows are cut
    into segments of 16 chunks (one piece each, or four pieces of 4), or run whole."""
    from longattn.kernels import linear_triton as lt

    if cut == "whole":
        monkeypatch.setattr(lt, "TARGET_ROWS", 1)
    if cut == "pieces":
        monkeypatch.setattr(lt, "PIECE_CHUNKS", 4)
    q, k, v, gate, decay, h0 = make_inputs(2, 2, 16384, 128, 128, torch.bfloat16, gating=gating, device="cuda")
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k * 128 ** -0.5, v,
                                                                                         gate, h0)]
    o, ht = api_run("triton", decay)(*leaves)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    live = [x for x in leaves if x is not None]
    got = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), live)
    refs = []
    for dtype in (torch.float64, torch.bfloat16):
        xs = [x.detach().to(dtype if i < 3 or dtype == torch.float64 else x.dtype).requires_grad_()
              for i, x in enumerate(live)]
        lg = _log_decay(xs[3] if gate is not None else None, decay, 2, 2, 16384, dtype)
        ro, rht = linear_attention_chunk(*xs[:3], lg, scale=128 ** -0.5, initial_state=xs[-1], state_dtype=dtype)
        loss = (ro.double() * do.double()).sum() + (rht.double() * dht.double()).sum()
        refs.append((ro, rht, torch.autograd.grad(loss, xs)))
    assert_close_to_reference(o, refs[0][0], refs[1][0], what="out")
    assert_close_to_reference(ht, refs[0][1], refs[1][1], what="final_state")
    for i, g in enumerate(got):
        assert_close_to_reference(g, refs[0][2][i], refs[1][2][i], grad=True, what=f"grad {i}")
