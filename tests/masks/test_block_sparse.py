"""``longattn.BlockSparse``: the block description every kernel consumes, against the element mask it encodes.

The element-level truth is the mask evaluated on full index grids (``masks.evaluate``; the factories themselves
are checked against plain-Python oracles in test_patterns.py). Everything here is exact: no tolerances.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mask_oracles import first_mismatch

from longattn import BlockSparse, masks
from longattn.masks import block_sparse
from longattn.masks.block_sparse import EMPTY, FULL, PARTIAL, ResolvedMask
from longattn.masks.varlen import causal_per_sequence

B, H = 2, 3  # builder extents: the stored B'/H' must shrink to 1 where a mask ignores b/h


def _split(n: int) -> list[int]:
    """Three document lengths summing to n, one of them empty."""
    a = n // 3
    return [a, 0, n - a]


# name -> (factory (Sq, Skv) -> mask, depends on b, depends on h)
FACTORIES = {
    "causal": (lambda Sq, Skv: masks.causal(offset=Skv - Sq), False, False),
    "causal+5": (lambda Sq, Skv: masks.causal(offset=5), False, False),
    "causal-9": (lambda Sq, Skv: masks.causal(offset=-9), False, False),
    "sliding": (lambda Sq, Skv: masks.sliding_window(20, offset=Skv - Sq), False, False),
    "sliding-2sided": (lambda Sq, Skv: masks.sliding_window(33, causal=False), False, False),
    "sinks": (lambda Sq, Skv: masks.sinks(3, 17, offset=Skv - Sq), False, False),
    "dilated-g16": (lambda Sq, Skv: masks.dilated(3, 2, granularity=16, offset=Skv - Sq), False, False),
    "dilated-g5-2sided": (lambda Sq, Skv: masks.dilated(2, 3, granularity=5, causal=False), False, False),
    "strided": (lambda Sq, Skv: masks.strided(2, local_window=8, granularity=16, offset=Skv - Sq), False, True),
    "per_head_window": (lambda Sq, Skv: masks.per_head_window([1, 17, 64], offset=Skv - Sq), False, True),
    "document": (lambda Sq, Skv: masks.document(_split(Sq), kv_seq_lens=_split(Skv)), False, False),
    "document&causal": (lambda Sq, Skv: masks.document(_split(Sq), kv_seq_lens=_split(Skv)) & masks.causal(),
                        False, False),
    "lambda": (lambda Sq, Skv: (lambda b, h, q, kv: ((q * 7 + kv * 3) % 5 != 0) & (kv <= q + 3)), False, False),
    "lambda-bh": (lambda Sq, Skv: (lambda b, h, q, kv: ((q + kv + b) % 3 != 0) | (h == 1)), True, True),
}
SIZES = [(1, 1), (1, 257), (7, 7), (7, 100), (100, 7), (100, 100), (100, 257), (257, 100), (257, 257)]
BLOCKS = [(16, 32), (32, 64), (64, 32)]


def _grids(b: int, h: int, sq: int, skv: int):
    return (torch.arange(b).view(-1, 1, 1, 1), torch.arange(h).view(1, -1, 1, 1),
            torch.arange(sq).view(1, 1, -1, 1), torch.arange(skv).view(1, 1, 1, -1))


def _expected(mask, bi: int, hi: int, sq: int, skv: int) -> torch.Tensor:
    return masks.evaluate(mask, *_grids(bi, hi, sq, skv)).expand(bi, hi, sq, skv)


def _block_spans(blocks) -> list[tuple[int, int]]:
    return list(zip(blocks.starts.tolist(), blocks.lens.tolist(), strict=True))


def _check_lists(bs: BlockSparse, dense: torch.Tensor) -> None:
    """Canonical CSR form: per row full entries then partial ones, each group ascending; full blocks are complete
    and all True; partial entries hold at least one True and are not a complete all-True block; every block
    with a True is listed; tile ids are -1 for full entries and valid for partial ones."""
    bq, bkv = bs.block_size
    q_spans, kv_spans = _block_spans(bs.q_blocks), _block_spans(bs.kv_blocks)
    n_tiles = bs.tiles.shape[0]
    Bp, Hp, nq = bs.kv_counts.shape
    for b, h, r in itertools.product(range(Bp), range(Hp), range(nq)):
        n, f = int(bs.kv_counts[b, h, r]), int(bs.full_counts[b, h, r])
        assert 0 <= f <= n <= len(kv_spans)
        idx = bs.kv_indices[b, h, r, :n].tolist()
        tids = bs.tile_ids[b, h, r, :n].tolist()
        full, part = idx[:f], idx[f:]
        assert full == sorted(set(full)) and part == sorted(set(part)), f"row {(b, h, r)}: {idx} (full {f})"
        assert not set(full) & set(part)
        assert all(t == -1 for t in tids[:f]) and all(0 <= t < n_tiles for t in tids[f:]), tids
        qs, ql = q_spans[r]
        row = dense[b, h, qs:qs + ql]
        listed = set(idx)
        for j, (ks, kl) in enumerate(kv_spans):
            blk = row[:, ks:ks + kl]
            if j in full:
                assert ql == bq and kl == bkv, f"full block {(b, h, r, j)} is a tail block ({ql}x{kl})"
                assert bool(blk.all())
            elif j in part:
                assert bool(blk.any()), f"partial block {(b, h, r, j)} is empty"
                assert not (ql == bq and kl == bkv and bool(blk.all())), f"partial block {(b, h, r, j)} is full"
            else:
                assert j not in listed and not bool(blk.any()), f"block {(b, h, r, j)} has Trues but is not listed"


def _computed_area(bs: BlockSparse, dense: torch.Tensor) -> int:
    """Tokens² of the blocks holding at least one True (the blocks the kernels must compute)."""
    total = 0
    for (qs, ql), (ks, kl) in itertools.product(_block_spans(bs.q_blocks), _block_spans(bs.kv_blocks)):
        total += int(dense[:, :, qs:qs + ql, ks:ks + kl].flatten(2).any(-1).sum()) * ql * kl
    return total


# ------------------------------------------------------------------------------------------ from_mask_mod
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"blk{b[0]}x{b[1]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"q{s[0]}-kv{s[1]}")
@pytest.mark.parametrize("name", list(FACTORIES))
def test_from_mask_mod_to_dense_matches_mask(name, size, block):
    make, dep_b, dep_h = FACTORIES[name]
    Sq, Skv = size
    mask = make(Sq, Skv)
    bs = BlockSparse.from_mask_mod(mask, B, H, Sq, Skv, block)
    bi, hi = (B if dep_b else 1), (H if dep_h else 1)
    assert bs.shape == (bi, hi, Sq, Skv)
    assert bs.block_size == block and not bs.varlen
    got = bs.to_dense()
    ref = _expected(mask, bi, hi, Sq, Skv)
    assert got.dtype == torch.bool and got.shape == ref.shape
    assert torch.equal(got, ref), f"{name}: {first_mismatch(got, ref)}"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"blk{b[0]}x{b[1]}")
@pytest.mark.parametrize("size", [(7, 100), (100, 100), (257, 100), (257, 257)], ids=lambda s: f"q{s[0]}-kv{s[1]}")
@pytest.mark.parametrize("name", list(FACTORIES))
def test_entries_are_canonical_and_densities_exact(name, size, block):
    make, _, _ = FACTORIES[name]
    Sq, Skv = size
    bs = BlockSparse.from_mask_mod(make(Sq, Skv), B, H, Sq, Skv, block)
    dense = bs.to_dense()
    _check_lists(bs, dense)
    n_pairs = dense.numel()  # B' * H' * Sq * Skv
    assert bs.density() == _computed_area(bs, dense) / n_pairs
    assert bs.mask_density() == int(dense.sum()) / n_pairs
    assert bs.mask_density() == float(dense.double().mean())  # exact: a sum of 0/1 in fp64, one division
    cls_map, tile_map = bs.block_map()
    assert bool(((cls_map == PARTIAL) == (tile_map >= 0)).all())


def test_causal_tiles_are_deduplicated():
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 1, 1024, 1024, (64, 64))
    assert bs.tiles.shape == (1, 64, 2)  # one diagonal tile: 64 rows x 64 // 32 words
    cls_map, tile_map = bs.block_map()
    diag = torch.arange(16)
    assert bool((cls_map[0, 0, diag, diag] == PARTIAL).all()) and bool((tile_map[0, 0, diag, diag] == 0).all())
    assert int((cls_map == PARTIAL).sum()) == 16 and int((cls_map == FULL).sum()) == 16 * 15 // 2
    assert torch.equal(bs.to_dense()[0, 0], torch.ones(1024, 1024, dtype=torch.bool).tril())


@pytest.mark.parametrize("name", ["sliding", "dilated-g5-2sided", "lambda-bh"])
def test_candidates_resolved_in_slices_equal_one_pass(name, monkeypatch):
    """_finish resolves undecided blocks a bounded slice at a time; tiny slices give the same description."""
    make = FACTORIES[name][0]
    mask = make(300, 300)
    one = BlockSparse.from_mask_mod(mask, B, H, 300, 300, (32, 32))
    density = one.mask_density()
    monkeypatch.setattr(block_sparse, "_EVAL_CHUNK_ELEMS", 3 * 32 * 32)  # three blocks per slice
    sliced = BlockSparse.from_mask_mod(mask, B, H, 300, 300, (32, 32))
    assert one.tiles.shape[0] > 3  # the slices really split the distinct tiles (dedup and bit counts too)
    for field in ("kv_indices", "kv_counts", "full_counts", "tile_ids", "tiles"):
        assert torch.equal(getattr(one, field), getattr(sliced, field)), field
    assert sliced.mask_density() == density


def test_ones_per_tile_counts_packed_bits_including_the_sign_bit():
    g = torch.Generator().manual_seed(3)
    tiles = torch.randint(-2**31, 2**31 - 1, (37, 16, 4), generator=g, dtype=torch.int64).int()
    tiles[0] = -1  # every bit set
    tiles[1] = 0
    want = block_sparse.unpack_bits(tiles, 128).flatten(1).sum(1)
    got = block_sparse._ones_per_tile(tiles)
    assert torch.equal(got, want) and int(got[0]) == 16 * 128 and int(got[1]) == 0


@pytest.mark.parametrize("broken", ["both", "first"])
def test_tile_hash_collisions_fall_back_to_exact_dedup(broken, monkeypatch):
    """Tiles are deduplicated by two content hashes; if one collides everywhere the other separates the tiles, if
    both do the exact row sort still does."""
    mask = FACTORIES["lambda-bh"][0](300, 300)
    one = BlockSparse.from_mask_mod(mask, B, H, 300, 300, (32, 32))
    real = block_sparse._hash_coefficients

    def coefficients(n, device):
        return torch.zeros(2, n, dtype=torch.long) if broken == "both" else real(n, device) * torch.tensor([[0], [1]])

    monkeypatch.setattr(block_sparse, "_hash_coefficients", coefficients)
    collided = BlockSparse.from_mask_mod(mask, B, H, 300, 300, (32, 32))
    assert collided.tiles.shape == one.tiles.shape and one.tiles.shape[0] > 1
    assert torch.equal(collided.to_dense(), one.to_dense())


# ------------------------------------------------------------------------------------------ from_block_mask
@given(
    bp=st.sampled_from([1, 2]), hp=st.sampled_from([1, 3]), sq=st.integers(1, 300), skv=st.integers(1, 300),
    block=st.sampled_from([(16, 32), (32, 64), (64, 32), (128, 128)]), p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_from_block_mask_expands_and_clips(bp, hp, sq, skv, block, p, seed):
    bq, bkv = block
    nq, nk = -(-sq // bq), -(-skv // bkv)
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(bp, hp, nq, nk, generator=g) < p
    bs = BlockSparse.from_block_mask(sel, sq, skv, block)
    assert bs.shape == (bp, hp, sq, skv)
    ref = sel.repeat_interleave(bq, 2).repeat_interleave(bkv, 3)[:, :, :sq, :skv]
    got = bs.to_dense()
    assert torch.equal(got, ref), first_mismatch(got, ref)
    # selected blocks are FULL unless they are tail blocks (then PARTIAL); the rest EMPTY
    complete = (bs.q_blocks.lens.view(-1, 1) == bq) & (bs.kv_blocks.lens.view(1, -1) == bkv)
    want = torch.where(sel, torch.where(complete, FULL, PARTIAL), EMPTY).to(torch.int8)
    assert torch.equal(bs.block_map()[0], want)
    _check_lists(bs, got)


def test_from_block_mask_within_is_bounded_per_batch_row():
    """``within`` that differs by batch row (and has bounds) restricts each row's blocks by its own bounds."""
    limit = torch.tensor([40, 200])

    def below(b, h, q, kv):
        return kv < limit[b]

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return kv_lo < limit[b], kv_hi < limit[b]

    sel = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    bs = BlockSparse.from_block_mask(sel, 256, 256, 64, within=masks.MaskMod(below, bounds=bounds))
    ref = (torch.arange(256).view(1, 1, 1, -1) < limit.view(2, 1, 1, 1)).expand(2, 1, 256, 256)
    assert torch.equal(bs.to_dense(), ref)


# ------------------------------------------------------------------------------------------ from_block_lists
def _limit_mask(limit: torch.Tensor) -> masks.MaskMod:
    """kv < limit[b, h] (batch/head dependent, with bounds)."""
    return masks.MaskMod(lambda b, h, q, kv: kv < limit[b, h],
                         bounds=lambda b, h, q_lo, q_hi, kv_lo, kv_hi: (kv_lo < limit[b, h], kv_hi < limit[b, h]))


WITHIN = {
    "none": lambda sq, skv, bp, hp: None,
    "causal": lambda sq, skv, bp, hp: masks.causal(offset=skv - sq),
    "sinks": lambda sq, skv, bp, hp: masks.sinks(3, 40, offset=skv - sq),
    "bh-limit": lambda sq, skv, bp, hp: _limit_mask(torch.arange(bp * hp).view(bp, hp) * 37 + 20),
    "unbounded": lambda sq, skv, bp, hp: (lambda b, h, q, kv: (q + kv) % 3 != 0),
}
RESOLVED = {"resolved causal": "causal", "resolved sinks": "sinks", "resolved unbounded": "unbounded"}


@given(
    bp=st.sampled_from([1, 2]), hp=st.sampled_from([1, 3]), sq=st.integers(1, 300), skv=st.integers(1, 300),
    block=st.sampled_from([(16, 32), (32, 64), (64, 32), (32, 32)]), k=st.integers(0, 6),
    within=st.sampled_from(sorted(WITHIN) + sorted(RESOLVED)), seed=st.integers(0, 2**16),
)
def test_from_block_lists_equals_the_block_map_build(bp, hp, sq, skv, block, k, within, seed):
    """Lists with repeats and -1 padding give the same description as from_block_mask on the equivalent map;
    a ResolvedMask (classification by lookup) gives what its mask gives."""
    bq, bkv = block
    nq, nk = -(-sq // bq), -(-skv // bkv)
    g = torch.Generator().manual_seed(seed)
    lists = torch.randint(-1, nk, (bp, hp, nq, k), generator=g)
    spill = torch.where(lists < 0, nk, lists)  # -1 entries land in a dropped extra column
    sel = torch.zeros(bp, hp, nq, nk + 1, dtype=torch.bool).scatter_(-1, spill, True)[..., :nk]
    w = WITHIN[RESOLVED.get(within, within)](sq, skv, bp, hp)
    resolved = ResolvedMask.build(w, sq, skv, block) if within in RESOLVED else w
    got = BlockSparse.from_block_lists(lists, sq, skv, block, within=resolved)
    want = BlockSparse.from_block_mask(sel, sq, skv, block, within=w)
    for field in ("kv_counts", "full_counts"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    width = want.kv_indices.shape[-1]
    used = torch.arange(width) < want.kv_counts[..., None]
    assert torch.equal(torch.where(used, got.kv_indices[..., :width], 0), torch.where(used, want.kv_indices, 0))
    assert torch.equal(got.block_map()[0], want.block_map()[0])
    assert torch.equal(got.to_dense(), want.to_dense())
    _check_lists(got, got.to_dense())
    assert got.density() == want.density() and got.mask_density() == want.mask_density()


def test_resolved_mask_rejects_batch_head_masks_and_other_grids():
    with pytest.raises(ValueError, match=r"^mask: a resolved mask must not depend on batch or head"):
        ResolvedMask.build(_limit_mask(torch.arange(4).view(2, 2) * 37 + 20), 256, 256, 64)
    resolved = ResolvedMask.build(masks.causal(), 256, 256, 64)
    lists = torch.zeros(1, 1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^within: resolved for \(seq_q, seq_kv, block, device\) = \(256, 256"):
        BlockSparse.from_block_lists(lists, 256, 300, 64, within=resolved)


@pytest.mark.parametrize(("bad", "exc", "pattern"), [
    (torch.zeros(1, 1, 4, 2), TypeError, r"^kv_blocks: expected a 4-D int32/int64 tensor"),
    (torch.zeros(1, 4, 2, dtype=torch.long), TypeError, r"^kv_blocks: expected a 4-D int32/int64 tensor"),
    (torch.zeros(1, 1, 3, 2, dtype=torch.long), ValueError, r"^kv_blocks: expected 4 query blocks"),
    (torch.full((1, 1, 4, 2), 4), ValueError, r"^kv_blocks: entries must be < 4"),
], ids=["float", "3d", "rows", "range"])
def test_from_block_lists_bad_input(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        BlockSparse.from_block_lists(bad, 256, 256, 64)


@pytest.mark.parametrize(("bad", "exc", "pattern"), [
    (torch.ones(1, 1, 4, 4), TypeError, r"^block_mask: expected a 4-D bool tensor"),
    (torch.ones(1, 4, 4, dtype=torch.bool), TypeError, r"^block_mask: expected a 4-D bool tensor"),
    ([[[[True]]]], TypeError, r"^block_mask: expected a 4-D bool tensor"),
    (torch.ones(1, 1, 4, 3, dtype=torch.bool), ValueError, r"^block_mask: expected block grid \(4, 4\)"),
    (torch.ones(1, 1, 5, 4, dtype=torch.bool), ValueError, r"^block_mask: expected block grid \(4, 4\)"),
], ids=["float", "3d", "list", "grid-kv", "grid-q"])
def test_from_block_mask_bad_input(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        BlockSparse.from_block_mask(bad, 100, 200, (32, 64))


# ------------------------------------------------------------------------------------------ FlexAttention
FLEX_CASES = [  # (factory name, Sq, Skv, block)
    ("causal", 100, 100, (32, 32)),
    ("sinks", 257, 100, (64, 32)),
    ("per_head_window", 100, 257, (32, 64)),
    ("lambda-bh", 70, 130, (16, 32)),
    ("document&causal", 257, 257, (64, 64)),
    ("dilated-g5-2sided", 7, 100, (16, 32)),
]


@pytest.mark.parametrize("keep_mask_mod", [True, False], ids=["source-mask_mod", "tile-lookup"])
@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: f"{c[0]}-q{c[1]}-kv{c[2]}-blk{c[3][0]}x{c[3][1]}")
def test_to_flex_from_flex_round_trip(case, keep_mask_mod):
    name, Sq, Skv, block = case
    make, _, _ = FACTORIES[name]
    bs = BlockSparse.from_mask_mod(make(Sq, Skv), B, H, Sq, Skv, block)
    if not keep_mask_mod:
        bs = dataclasses.replace(bs, mask_mod=None)
    bm = bs.to_flex()
    assert tuple(bm.seq_lengths) == (Sq, Skv) and tuple(bm.BLOCK_SIZE) == block
    cls_map, _ = bs.block_map()
    assert torch.equal(bm.to_dense().bool(), cls_map != EMPTY)  # flex's block-level view: the same blocks
    back = BlockSparse.from_flex(bm)
    assert back.shape == bs.shape and back.block_size == bs.block_size
    got, ref = back.to_dense(), bs.to_dense()
    assert torch.equal(got, ref), f"{name}: {first_mismatch(got, ref)}"
    assert torch.equal(back.block_map()[0], cls_map)


# ------------------------------------------------------------------------------------------ packed varlen
LENS_Q = [5, 0, 70, 0, 33, 1, 64]
LENS_KV = [9, 4, 70, 0, 33, 17, 64]


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _expected_blocks(lens: list[int], block: int) -> tuple[list[int], list[int], list[int]]:
    starts, blens, seqs, pos = [], [], [], 0
    for i, n in enumerate(lens):
        for lo in range(0, n, block):
            starts.append(pos + lo)
            blens.append(min(block, n - lo))
            seqs.append(i)
        pos += n
    return starts, blens, seqs


# name -> (build (cu_q, cu_kv) -> mask_mod, independent oracle (doc, h, q_local, kv_local) -> bool, depends on h)
VARLEN_CASES = {
    "all": (lambda cq, ck: (lambda b, h, q, kv: q >= 0), lambda d, h, q, kv: True, False),
    "causal_per_sequence": (causal_per_sequence,
                            lambda d, h, q, kv: kv <= q + LENS_KV[d] - LENS_Q[d], False),
    "sliding": (lambda cq, ck: masks.sliding_window(8, causal=False), lambda d, h, q, kv: abs(q - kv) < 8, False),
    "doc-parity": (lambda cq, ck: (lambda b, h, q, kv: (kv + b) % 2 == 0), lambda d, h, q, kv: (kv + d) % 2 == 0,
                   False),
    "per_head": (lambda cq, ck: masks.per_head_window([3, 20, 1]), lambda d, h, q, kv: 0 <= q - kv < [3, 20, 1][h],
                 True),
}


def _varlen_oracle(fn, hi: int) -> torch.Tensor:
    """Document-local mask over the packed sequences, by a plain Python loop."""
    q_doc = [(i, j) for i, n in enumerate(LENS_Q) for j in range(n)]
    kv_doc = [(i, j) for i, n in enumerate(LENS_KV) for j in range(n)]
    rows = [[[dq == dk and bool(fn(dq, h, ql, kl)) for dk, kl in kv_doc] for dq, ql in q_doc] for h in range(hi)]
    return torch.tensor(rows, dtype=torch.bool).view(1, hi, len(q_doc), len(kv_doc))


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"blk{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_packed_varlen(name, block):
    build, oracle, dep_h = VARLEN_CASES[name]
    cu_q, cu_kv = _cu(LENS_Q), _cu(LENS_KV)
    Sq, Skv = int(cu_q[-1]), int(cu_kv[-1])
    bs = BlockSparse.from_mask_mod(build(cu_q, cu_kv), 1, H, Sq, Skv, block, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    hi = H if dep_h else 1
    assert bs.varlen and bs.shape == (1, hi, Sq, Skv)
    for blocks, lens, size in ((bs.q_blocks, LENS_Q, block[0]), (bs.kv_blocks, LENS_KV, block[1])):
        starts, blens, seqs = _expected_blocks(lens, size)
        assert blocks.starts.tolist() == starts, "blocks must restart at every sequence"
        assert blocks.lens.tolist() == blens and blocks.seq.tolist() == seqs
    got, ref = bs.to_dense(), _varlen_oracle(oracle, hi)
    assert torch.equal(got, ref), f"{name}: {first_mismatch(got, ref)}"
    _check_lists(bs, got)
    same_doc_pairs = sum(a * b for a, b in zip(LENS_Q, LENS_KV, strict=True)) * hi
    assert bs.mask_density() == int(got.sum()) / same_doc_pairs
    assert bs.density() == _computed_area(bs, got) / same_doc_pairs  # blocks never straddle sequences
    with pytest.raises(ValueError, match=r"^to_flex: packed"):
        bs.to_flex()


def test_packed_varlen_cu_seqlens_q_alone_is_shared():
    cu = _cu(LENS_Q)
    n = int(cu[-1])
    one = BlockSparse.from_mask_mod(masks.causal(), 1, 1, n, n, (16, 32), cu_seqlens_q=cu)
    both = BlockSparse.from_mask_mod(masks.causal(), 1, 1, n, n, (16, 32), cu_seqlens_q=cu, cu_seqlens_kv=cu)
    assert torch.equal(one.to_dense(), both.to_dense())
    assert one.kv_blocks.starts.tolist() == both.kv_blocks.starts.tolist()


# ------------------------------------------------------------------------------------------ transposed
@pytest.mark.parametrize("name", ["causal", "per_head_window", "lambda-bh", "sinks", "document&causal"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"blk{b[0]}x{b[1]}")
def test_transposed_lists_match_block_map(name, block):
    make, _, _ = FACTORIES[name]
    Sq, Skv = 257, 100
    bs = BlockSparse.from_mask_mod(make(Sq, Skv), B, H, Sq, Skv, block)
    cls_map, tile_map = bs.block_map()
    t = bs.transposed()
    Bp, Hp, nq, nk = cls_map.shape
    assert t.counts.shape == (Bp, Hp, nk) and t.full_counts.shape == (Bp, Hp, nk)
    for b, h, c in itertools.product(range(Bp), range(Hp), range(nk)):
        col = cls_map[b, h, :, c]
        full = torch.nonzero(col == FULL).flatten().tolist()
        part = torch.nonzero(col == PARTIAL).flatten().tolist()
        n = len(full) + len(part)
        assert int(t.counts[b, h, c]) == n and int(t.full_counts[b, h, c]) == len(full)
        assert t.indices[b, h, c, :n].tolist() == full + part
        assert t.tile_ids[b, h, c, :n].tolist() == tile_map[b, h, full + part, c].tolist()
    assert bs.transposed() is t  # built once


# ------------------------------------------------------------------------------------------ bad arguments
_CU_BAD_START = torch.tensor([1, 5, 10], dtype=torch.int32)
BAD_ARGS = {  # name -> (kwargs overriding a valid call, exception, message regex naming the argument)
    "block-not-pow2": ({"block": (48, 64)}, ValueError, r"^block: .*power of two >= 16, got 48"),
    "block-kv-not-pow2": ({"block": (32, 96)}, ValueError, r"^block: .*kv block .*power of two >= 32, got 96"),
    "block-kv-16": ({"block": (32, 16)}, ValueError, r"^block: expected a kv block size .*>= 32, got 16"),
    "block-q-8": ({"block": 8}, ValueError, r"^block: .*>= 16, got 8"),
    "B-0": ({"B": 0}, ValueError, r"^B: expected a positive int, got 0"),
    "H-0": ({"H": 0}, ValueError, r"^H: expected a positive int, got 0"),
    "seq_q-0": ({"seq_q": 0}, ValueError, r"^seq_q: expected a positive int, got 0"),
    "seq_kv-float": ({"seq_kv": 10.0}, ValueError, r"^seq_kv: expected a positive int"),
    "mask-not-callable": ({"mask_mod": 3}, TypeError, r"^mask_mod: expected"),
    "cu-not-from-0": ({"cu_seqlens_q": _CU_BAD_START}, ValueError,
                      r"^cu_seqlens_q: expected non-decreasing offsets from 0 to 10, got \[1, 5, 10\]"),
    "cu-kv-not-from-0": ({"cu_seqlens_q": torch.tensor([0, 5, 10]), "cu_seqlens_kv": _CU_BAD_START}, ValueError,
                         r"^cu_seqlens_kv: expected non-decreasing offsets from 0 to 10"),
    "cu-decreasing": ({"cu_seqlens_q": torch.tensor([0, 6, 5, 10])}, ValueError, r"^cu_seqlens_q: .*non-decreasing"),
    "cu-float": ({"cu_seqlens_q": torch.tensor([0.0, 10.0])}, TypeError, r"^cu_seqlens_q: expected a 1-D int"),
    "cu-count-mismatch": ({"cu_seqlens_q": torch.tensor([0, 5, 10]), "cu_seqlens_kv": torch.tensor([0, 10])},
                          ValueError, r"^cu_seqlens_kv: expected 3 offsets"),
    "cu-B-2": ({"B": 2, "cu_seqlens_q": torch.tensor([0, 5, 10])}, ValueError, r"^B: packed .*B=1, got 2"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_raise_naming_the_argument(name):
    override, exc, pattern = BAD_ARGS[name]
    kwargs = {"mask_mod": masks.causal(), "B": 1, "H": 1, "seq_q": 10, "seq_kv": 10, "block": (32, 32), **override}
    with pytest.raises(exc, match=pattern):
        BlockSparse.from_mask_mod(**kwargs)


def test_from_block_mask_bad_block_size():
    with pytest.raises(ValueError, match=r"^block: .*kv block .*got 16"):
        BlockSparse.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 10, 10, (16, 16))
