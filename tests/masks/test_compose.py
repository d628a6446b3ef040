"""Composition with & | ~: elementwise equal to the parts, under vmap too, and bounds that stay sound."""

from __future__ import annotations

import pytest
import torch
from bound_checks import aligned, bounds_of, brute, check, ranges
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_oracles import grids
from torch.nn.attention.flex_attention import create_mask

from longattn import masks as M

B, H, Q, K = 2, 4, 45, 52


def _plain_band(b, h, q_idx, kv_idx):  # a user mask_mod without bounds
    return (q_idx - kv_idx).abs() <= h + 2


PARTS = {
    "causal_o7": lambda: M.causal(offset=7),
    "sliding5_nc": lambda: M.sliding_window(5, causal=False),
    "global3": lambda: M.global_tokens(3),
    "document": lambda: M.document([10, 0, 17, 25]),
    "strided2_g3": lambda: M.strided(2, local_window=4, granularity=3, offset=7),
    "block_local4": lambda: M.block_local(4, causal=False),
    "power_g2": lambda: M.power(granularity=2, offset=7),
    "sinks": lambda: M.sinks(2, 6, offset=7),
    "neighborhood": lambda: M.neighborhood((5, 9), (3, 5), stride=(1, 2)),
    "radial": lambda: M.radial(6, 8, sink_frames=1),
    "per_head": lambda: M.per_head_window([1, 3, 8, 20], causal=False),
    "plain": lambda: M.as_mask_mod(_plain_band),
}
COMBOS = [
    ("document", "&", "causal_o7"), ("sliding5_nc", "|", "global3"), ("strided2_g3", "&", "block_local4"),
    ("power_g2", "|", "sinks"), ("neighborhood", "&", "causal_o7"), ("radial", "|", "document"),
    ("per_head", "&", "plain"), ("plain", "|", "causal_o7"), ("document", "~", None), ("sliding5_nc", "~", None),
    ("strided2_g3", "~", None), ("plain", "~", None),
]
COMBO_IDS = [f"{a}{op}{b or ''}" for a, op, b in COMBOS]


def build(a: str, op: str, b: str | None):
    ma = PARTS[a]()
    if op == "~":
        return ~ma, [ma]
    mb = PARTS[b]()
    return (ma & mb if op == "&" else ma | mb), [ma, mb]


def dense(mask) -> torch.Tensor:
    return M.evaluate(mask, *grids(B, H, Q, K)).expand(B, H, Q, K)


@pytest.mark.parametrize(("a", "op", "b"), COMBOS, ids=COMBO_IDS)
def test_composition_is_elementwise(a, op, b):
    mask, parts = build(a, op, b)
    got = dense(mask)
    if op == "~":
        want = ~dense(parts[0])
    elif op == "&":
        want = dense(parts[0]) & dense(parts[1])
    else:
        want = dense(parts[0]) | dense(parts[1])
    assert torch.equal(got, want), mask.name
    assert torch.equal(create_mask(mask, B, H, Q, K, device="cpu"), got), f"vmap differs: {mask.name}"


@pytest.mark.parametrize(("a", "op", "b"), COMBOS, ids=COMBO_IDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_composition_bounds_sound(a, op, b, data):
    mask, _ = build(a, op, b)
    q_rng = data.draw(ranges(Q), label="q ranges")
    kv_rng = data.draw(ranges(K), label="kv ranges")
    check(mask, dense(mask), q_rng, kv_rng, exact=False)


def test_exact_parts_keep_the_exact_half():
    """With exact parts, any(a | b) and all(a & b) stay exact (the other halves are only sound)."""
    d, c, g = M.document([10, 0, 17, 25]), M.causal(offset=7), M.global_tokens(3)
    for blk in (1, 4, 8):
        q_rng, kv_rng = aligned(Q, blk), aligned(K, blk)
        union, inter = d | g, d & c
        assert torch.equal(bounds_of(union, B, H, q_rng, kv_rng)[0], brute(dense(union), q_rng, kv_rng)[0])
        assert torch.equal(bounds_of(inter, B, H, q_rng, kv_rng)[1], brute(dense(inter), q_rng, kv_rng)[1])
    assert (d & c).name == "(document(4 docs, 52 tokens) & causal(offset=7))"
    assert (~c).name == "~causal(offset=7)"


@settings(max_examples=10)
@given(data=st.data())
def test_head_offset_is_the_same_pattern_on_later_heads(data):
    """``head_offset(2)`` on heads 0..1 equals the per-head pattern on heads 2..3, and its bounds stay sound."""
    whole = M.per_head_window([1, 3, 8, 20], causal=False) & M.strided(2, local_window=4, granularity=3)
    part = whole.head_offset(2)
    torch.testing.assert_close(M.evaluate(part, *grids(B, 2, Q, K)).expand(B, 2, Q, K), dense(whole)[:, 2:],
                               rtol=0, atol=0)
    check(part, dense(whole)[:, 2:], data.draw(ranges(Q)), data.draw(ranges(K)), exact=False)
