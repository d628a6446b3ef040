"""Causal linear attention: Triton chunked kernels (interpreted here), the PyTorch chunked form and the fused
recurrent step against the fp64 recurrence, forward and gradients, under the oracle rule."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn import linear_attention, linear_attention_step
from longattn.kernels.linear_reference import linear_attention_chunk, linear_attention_recurrent
from tests.oracle import assert_close_to_reference

NAMES = ("q", "k", "v", "gate", "h0")


def make_inputs(B, H, S, Dk, Dv, dtype, *, gating="gate", with_h0=True, n_states=None, device="cpu", seed=0):
    """q, k, v in ``dtype``; gate fp32 log-decay (or a per-head decay); fp32 initial state (or None)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(B, H, S, Dk, generator=g, device=device).to(dtype) for _ in range(2))
    v = torch.randn(B, H, S, Dv, generator=g, device=device).to(dtype)
    gate = decay = None
    if gating == "gate":
        gate = -0.4 * torch.rand(B, H, S, generator=g, device=device)
    elif gating == "decay":
        decay = torch.linspace(0.8, 1.0, H, device=device)
    h0 = torch.randn(n_states or B, H, Dk, Dv, generator=g, device=device) if with_h0 else None
    return q, k, v, gate, decay, h0


def oracle_check(run, q, k, v, gate, decay, h0, *, cu_seqlens=None, chunk=64):
    """``run(q, k, v, gate, h0) -> (o, final)`` checked with its gradients (loss ⟨o, do⟩ + ⟨final, dfinal⟩) against
    the fp64 recurrence. Baseline: plain PyTorch in the inputs' precision, the recurrence for fp16/bf16 and the
    chunked form for fp32 (in fp32 the one-term-per-step recurrence rounds far less than any chunked summation
    order, so it would measure the order of additions, not the precision)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (q, k, v, gate, h0)]
    o, ht = run(*leaves)
    g = torch.Generator(device=q.device).manual_seed(1)
    do = torch.randn(o.shape, generator=g, device=q.device)
    dht = torch.randn(ht.shape, generator=g, device=q.device)
    results = [(o, ht, _grads(o, ht, do, dht, leaves))]
    scale = q.shape[-1] ** -0.5
    for dtype in (torch.float64, q.dtype):
        xs = [x.detach().to(dtype if i < 3 or dtype == torch.float64 else x.dtype).requires_grad_()
              if x is not None else None for i, x in enumerate(leaves)]
        lg = _log_decay(xs[3], decay, *q.shape[:3], dtype)
        if dtype == torch.float32:
            ro, rht = linear_attention_chunk(*xs[:3], lg, scale=scale, initial_state=xs[4], cu_seqlens=cu_seqlens,
                                             chunk=chunk, state_dtype=dtype)
        else:
            ro, rht = linear_attention_recurrent(*xs[:3], lg, scale=scale, initial_state=xs[4],
                                                 cu_seqlens=cu_seqlens, state_dtype=dtype)
        results.append((ro, rht, _grads(ro, rht, do, dht, xs)))
    (o, ht, gr), (ro, rht, rg), (lo, lht, lg_) = results
    assert_close_to_reference(o, ro, lo, what="out")
    assert_close_to_reference(ht, rht, lht, what="final_state")
    for name, a, r, lp in zip(NAMES, gr, rg, lg_, strict=True):
        if r is not None:
            assert_close_to_reference(a, r, lp, grad=True, what=f"d{name}")


def _log_decay(gate, decay, B, H, S, dtype):
    if decay is not None:
        return torch.log(decay.to(dtype))[None, :, None].expand(B, H, S)
    return None if gate is None else gate.to(dtype)


def _grads(o, ht, do, dht, leaves):
    live = [x for x in leaves if x is not None]
    loss = (o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return [next(got) if x is not None else None for x in leaves]


def api_run(impl, decay=None, cu_seqlens=None, chunk=64):
    def run(q, k, v, gate, h0):
        return linear_attention(q, k, v, gate=gate, decay=decay, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu_seqlens, impl=impl, chunk_size=chunk)
    return run


SHAPES = [(1, 16, 16, 16), (37, 16, 32, 16), (130, 32, 16, 64)]  # S, Dk, Dv, chunk
SHAPE_IDS = [f"s{s}-dk{dk}-dv{dv}-c{c}" for s, dk, dv, c in SHAPES]


@pytest.mark.parametrize("gating", ["none", "decay", "gate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("impl", ["triton", "chunk"])
def test_matches_fp64_recurrence(impl, shape, dtype, gating):
    S, Dk, Dv, chunk = shape
    q, k, v, gate, decay, h0 = make_inputs(2, 2, S, Dk, Dv, dtype, gating=gating)
    oracle_check(api_run(impl, decay, chunk=chunk), q, k, v, gate, decay, h0, chunk=chunk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_without_initial_state(dtype):
    q, k, v, gate, decay, h0 = make_inputs(1, 2, 40, 16, 16, dtype, with_h0=False)
    oracle_check(api_run("triton", chunk=16), q, k, v, gate, decay, h0, chunk=16)


def test_decay_gradient_is_the_summed_gate_gradient():
    """A learnable per-head decay gets Σ dg / decay through the kernel's log-decay gradient (whose per-token
    accuracy the oracle tests above check)."""
    q, k, v, gate, _, h0 = make_inputs(2, 3, 45, 16, 16, torch.float16)
    decay = torch.tensor([0.5, 0.9, 1.0], requires_grad=True)
    o, ht = linear_attention(q, k, v, decay=decay, gate=gate, initial_state=h0, output_final_state=True,
                             impl="triton", chunk_size=16)
    (d_decay,) = torch.autograd.grad(o.float().sum() + ht.sum(), [decay])
    g = (gate + torch.log(decay.detach())[None, :, None]).requires_grad_()
    o, ht = linear_attention(q, k, v, gate=g, initial_state=h0, output_final_state=True, impl="triton",
                             chunk_size=16)
    (d_gate,) = torch.autograd.grad(o.float().sum() + ht.sum(), [g])
    torch.testing.assert_close(d_decay, d_gate.sum((0, 2)) / decay.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("split", [1, 16, 23])
@pytest.mark.parametrize("impl", ["triton", "chunk"])
def test_split_then_resume_equals_full(impl, split):
    """Two calls chained through the final state compute the same function as one call, gradients included."""
    q, k, v, gate, decay, h0 = make_inputs(2, 2, 50, 16, 16, torch.float16)

    def run(q, k, v, gate, h0):
        kw = dict(output_final_state=True, impl=impl, chunk_size=16)
        o1, s1 = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], gate=gate[:, :, :split],
                                  initial_state=h0, **kw)
        o2, s2 = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], gate=gate[:, :, split:],
                                  initial_state=s1, **kw)
        return torch.cat([o1, o2], 2), s2

    oracle_check(run, q, k, v, gate, decay, h0)


@pytest.fixture(params=[(1, 64), (3, 1), (3, 2)], ids=["seg1-piece1", "seg3-piece1", "seg4-piece2"])
def one_chunk_segments(request, monkeypatch):
    """Cut every sequence into segments of a few chunks and pieces of one or two (small problems otherwise run as
    whole sequences), so that the piece-state, carry and walk kernels all take part."""
    from longattn.kernels import linear_triton as lt

    min_segment, piece = request.param
    monkeypatch.setattr(lt, "TARGET_ROWS", 1 << 20)
    monkeypatch.setattr(lt, "MIN_SEGMENT_CHUNKS", min_segment)
    monkeypatch.setattr(lt, "PIECE_CHUNKS", piece)


@pytest.mark.parametrize("gating", ["none", "decay", "gate"])
def test_triton_segments_match_oracle(one_chunk_segments, gating):
    q, k, v, gate, decay, h0 = make_inputs(2, 2, 70, 16, 32, torch.float16, gating=gating)
    oracle_check(api_run("triton", decay, chunk=16), q, k, v, gate, decay, h0, chunk=16)


@pytest.mark.parametrize("with_h0", [False, True])
def test_triton_segments_varlen_matches_oracle(one_chunk_segments, with_h0):
    cu = [0, 20, 20, 33, 70]
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    q, k, v, gate, decay, h0 = make_inputs(1, 2, cu[-1], 16, 16, torch.float32, n_states=len(cu) - 1,
                                           with_h0=with_h0)
    oracle_check(api_run("triton", cu_seqlens=cu_seqlens, chunk=16), q, k, v, gate, decay, h0,
                 cu_seqlens=cu_seqlens, chunk=16)


def test_segment_length_choice():
    """Whole sequences when (sequence, head) rows fill the GPU; otherwise equal segments, never shorter than the
    minimum."""
    from longattn.kernels import linear_triton as lt

    assert lt.segment_chunks_for(256, 16, 64) == 64
    assert lt.segment_chunks_for(1, 16, 16384) == 16384 * 16 // lt.TARGET_ROWS
    assert lt.segment_chunks_for(1, 1, 40) == lt.MIN_SEGMENT_CHUNKS
    plan = lt.Plan(1, 100, 2, torch.tensor([0, 0, 100]), 16, torch.device("cpu"))  # an empty sequence first
    assert (plan.n_seq, plan.n_segs, plan.split) == (2, 2, False)
    assert plan.segs[2].tolist() == [0, 100]


def test_split_plan_pieces(monkeypatch):
    """Segments are whole numbers of pieces; each segment knows its first and last piece."""
    from longattn.kernels import linear_triton as lt

    monkeypatch.setattr(lt, "TARGET_ROWS", 1 << 20)
    monkeypatch.setattr(lt, "MIN_SEGMENT_CHUNKS", 3)
    monkeypatch.setattr(lt, "PIECE_CHUNKS", 2)
    plan = lt.Plan(1, 150, 1, torch.tensor([0, 0, 150]), 16, torch.device("cpu"))  # 10 chunks: segments of 4
    assert plan.split and plan.segs[2].tolist() == [0, 64, 64, 22]
    assert plan.pieces[2].tolist() == [0, 32, 32, 32, 32, 22]
    assert plan.first_piece.tolist() == [0, 1, 3, 5] and plan.last_piece.tolist() == [0, 2, 4, 5]



def test_plans_cached_per_shape_and_segment_sizes(monkeypatch):
    """Equal-length batches reuse one Plan per shape (no per-call host work); a change of the segment sizes (as
    the tests above patch them) gets its own, and packed batches always get a fresh one."""
    from longattn.kernels import linear_triton as lt

    cpu = torch.device("cpu")
    plan = lt.plan_for(128, 1000, 2, None, 16, cpu)
    assert lt.plan_for(128, 1000, 2, None, 16, cpu) is plan and not plan.split
    monkeypatch.setattr(lt, "TARGET_ROWS", 1 << 20)
    split = lt.plan_for(128, 1000, 2, None, 16, cpu)
    assert split is not plan and split.split
    cu = torch.tensor([0, 1000])
    assert lt.plan_for(1, 1000, 2, cu, 16, cpu) is not lt.plan_for(1, 1000, 2, cu, 16, cpu)


def test_autotuning_keys_tell_small_launches_from_large():
    """Every autotuned kernel keys on the launch's size class, and a small split call (a 2k correctness check) and
    a 1M-token split call fall in different classes: the check no longer picks the tile the large call runs with."""
    from longattn.kernels import linear_triton as lt

    for kernel in (lt._piece_state, lt._fwd_walk, lt._dq_walk, lt._dk_walk, lt._dv_walk):
        assert "SIZE" in kernel.keys, kernel.fn.__name__
    cpu = torch.device("cpu")
    small, large = lt.plan_for(1, 2048, 2, None, 64, cpu), lt.plan_for(1, 1 << 20, 16, None, 64, cpu)
    assert small.split and large.split
    assert small.walk_size != large.walk_size and small.state_size != large.state_size


CU = [[0, 37], [0, 1, 17, 50], [0, 20, 20, 33, 70]]


@pytest.mark.parametrize("cu", CU, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("impl", ["triton", "chunk"])
def test_varlen_matches_oracle(impl, cu):
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    q, k, v, gate, decay, h0 = make_inputs(1, 2, cu[-1], 16, 32, torch.float32, n_states=len(cu) - 1)
    oracle_check(api_run(impl, cu_seqlens=cu_seqlens, chunk=16), q, k, v, gate, decay, h0, cu_seqlens=cu_seqlens,
                 chunk=16)


def test_varlen_equals_per_sequence_runs():
    """A packed batch gives each sequence exactly what a call on that sequence alone gives (same chunks)."""
    cu = [0, 19, 19, 50, 66]
    q, k, v, gate, _, h0 = make_inputs(1, 2, cu[-1], 16, 16, torch.float16, n_states=len(cu) - 1)
    o, ht = linear_attention(q, k, v, gate=gate, initial_state=h0, output_final_state=True, impl="triton",
                             chunk_size=16, cu_seqlens=torch.tensor(cu))
    for i, (lo, hi) in enumerate(pairwise(cu)):
        oi, hi_state = linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], gate=gate[:, :, lo:hi],
                                        initial_state=h0[i:i + 1], output_final_state=True, impl="triton",
                                        chunk_size=16)
        assert torch.equal(o[:, :, lo:hi], oi)
        assert torch.equal(ht[i:i + 1], hi_state)


@pytest.mark.parametrize("tokens_per_step", [1, 3])
@pytest.mark.parametrize("gating", ["decay", "gate"])
@pytest.mark.parametrize("impl", ["triton", "recurrent"])
def test_decoding_steps_equal_full(impl, gating, tokens_per_step):
    """Decoding from a state, a few tokens per step, reproduces one full run (fp64 oracle rule)."""
    S = 7
    q, k, v, gate, decay, h0 = make_inputs(2, 2, S, 16, 32, torch.float16, gating=gating)

    def run(q, k, v, gate, h0):
        state, outs = h0, []
        for lo in range(0, S, tokens_per_step):
            sl = slice(lo, lo + tokens_per_step)
            o, state = linear_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, decay=decay,
                                             gate=None if gate is None else gate[:, :, sl], impl=impl)
            outs.append(o)
        return torch.cat(outs, 2), state

    leaves = [x for x in (q, k, v, gate, h0)]
    o, st_ = run(*leaves)
    scale = 16 ** -0.5
    refs = []
    for dtype in (torch.float64, torch.float16):
        ref_o, ref_s = linear_attention_recurrent(q.to(dtype), k.to(dtype), v.to(dtype),
                                                  _log_decay(gate, decay, 2, 2, S, dtype), scale=scale,
                                                  initial_state=h0.to(dtype), state_dtype=dtype)
        refs.append((ref_o, ref_s))
    assert_close_to_reference(o, refs[0][0], refs[1][0], what="out")
    assert_close_to_reference(st_, refs[0][1], refs[1][1], what="state")


def test_auto_is_chunk_on_cpu():
    q, k, v, gate, _, h0 = make_inputs(1, 2, 20, 16, 16, torch.float32)
    a = linear_attention(q, k, v, gate=gate, initial_state=h0)[0]
    b = linear_attention(q, k, v, gate=gate, initial_state=h0, impl="chunk")[0]
    assert torch.equal(a, b)


@given(S=st.integers(1, 70), chunk=st.sampled_from([16, 32]), Dk=st.integers(1, 9), Dv=st.integers(1, 9),
       n_cut=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_chunk_form_matches_recurrence_random(S, chunk, Dk, Dv, n_cut, seed):
    """Random lengths, odd head dims and packed cuts: the chunked PyTorch form equals the recurrence (fp64)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, S + 1, (n_cut,), generator=g).tolist())
    cu = torch.tensor([0, *cuts, S])
    q, k = (torch.randn(1, 2, S, Dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, S, Dv, generator=g, dtype=torch.float64)
    lg = -torch.rand(1, 2, S, generator=g, dtype=torch.float64)
    h0 = torch.randn(len(cu) - 1, 2, Dk, Dv, generator=g, dtype=torch.float64)
    a = linear_attention_chunk(q, k, v, lg, scale=0.5, initial_state=h0, cu_seqlens=cu, chunk=chunk)
    b = linear_attention_recurrent(q, k, v, lg, scale=0.5, initial_state=h0, cu_seqlens=cu)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def _bad_cases():
    q = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 32)
    return {
        "decay_zero": (dict(decay=torch.tensor([0.0, 0.5])), ValueError, "decay values must lie in"),
        "decay_above_one": (dict(decay=torch.tensor([1.5, 0.5])), ValueError, "decay values must lie in"),
        "decay_shape": (dict(decay=torch.tensor([0.5])), ValueError, "decay must be a tensor of shape"),
        "gate_shape": (dict(gate=torch.zeros(1, 2, 7)), ValueError, "gate must be a log-decay tensor"),
        "state_shape": (dict(initial_state=torch.zeros(1, 2, 32, 16)), ValueError, "initial_state must be"),
        "state_count": (dict(initial_state=torch.zeros(2, 2, 16, 32), cu_seqlens=torch.tensor([0, 8])),
                        ValueError, "initial_state must be"),
        "cu_start": (dict(cu_seqlens=torch.tensor([1, 8])), ValueError, "non-decreasing from 0"),
        "cu_end": (dict(cu_seqlens=torch.tensor([0, 4, 7])), ValueError, "non-decreasing from 0"),
        "cu_order": (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), ValueError, "non-decreasing from 0"),
        "cu_dtype": (dict(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens must be int32"),
        "k_shape": (dict(k=torch.randn(1, 2, 8, 8)), ValueError, "k must have q's shape"),
        "v_len": (dict(v=v[:, :, :5]), ValueError, "v must be"),
        "dtype_mix": (dict(k=q.half()), TypeError, "must share a dtype"),
        "impl": (dict(impl="fast"), ValueError, "impl must be one of"),
        "chunk": (dict(chunk_size=48), ValueError, "chunk_size must be"),
        "rank": (dict(q=q[0], k=q[0]), ValueError, r"q must be \[B, H, S, D\]"),
    }, q, v


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_bad_inputs_raise_clear_errors(case):
    cases, q, v = _bad_cases()
    kw, err, match = cases[case]
    args = {"q": q, "k": q.clone(), "v": v, **kw}
    with pytest.raises(err, match=match):
        linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_step_bad_state_shape():
    q = torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_step(q, q, q, torch.zeros(2, 2, 16, 8))


def test_step_decay_checked_again_after_an_in_place_change():
    """The decay's values are read back once per tensor version (no GPU sync per decoding step), so an in-place
    edit that makes them invalid is still caught."""
    q = torch.randn(1, 2, 1, 16)
    state = torch.zeros(1, 2, 16, 16)
    decay = torch.tensor([0.9, 0.5])
    linear_attention_step(q, q, q, state, decay=decay)
    linear_attention_step(q, q, q, state, decay=decay)
    decay[0] = 1.5
    with pytest.raises(ValueError, match="decay values must lie in"):
        linear_attention_step(q, q, q, state, decay=decay)
    fresh = torch.tensor([0.0, 0.5])
    with pytest.raises(ValueError, match="decay values must lie in"):
        linear_attention_step(q, q, q, state, decay=fresh)
