"""Plain-Python oracles for every mask factory, written from the definitions, plus the shared case table.

Each oracle is a function ``(b, h, q, kv) -> bool`` on Python ints; ``dense`` loops over a grid to build the
reference tensor. ``CASES`` pairs a factory call with its oracle and grid shape; ``exact`` marks the cases
whose bounds must be exact on every rectangle (the rest only need to be sound).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn import masks as M

Oracle = Callable[[int, int, int, int], bool]


def dense(oracle: Oracle, B: int, H: int, Q: int, K: int) -> torch.Tensor:
    """The oracle evaluated on every (b, h, q, kv) by a plain double loop."""
    vals = [[[[bool(oracle(b, h, q, k)) for k in range(K)] for q in range(Q)] for h in range(H)] for b in range(B)]
    return torch.tensor(vals, dtype=torch.bool).reshape(B, H, Q, K)


def grids(B: int, H: int, Q: int, K: int):
    """Broadcast index grids b [B,1,1,1], h [1,H,1,1], q [1,1,Q,1], kv [1,1,1,K]."""
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(Q).view(1, 1, Q, 1), torch.arange(K).view(1, 1, 1, K))


def is_pow2_or_zero(x: int) -> bool:
    return x == 0 or (x > 0 and bin(x).count("1") == 1)


# --------------------------------------------------------------------------------------------- oracles
def o_full():
    return lambda b, h, q, k: True


def o_causal(off):
    return lambda b, h, q, k: k <= q + off


def o_sliding(w, causal, off):
    def f(b, h, q, k):
        d = q + off - k
        return 0 <= d < w if causal else -w < d < w
    return f


def o_sinks(ns, w, off):
    def f(b, h, q, k):
        d = q + off - k
        return d >= 0 and (k < ns or d < w)
    return f


def o_dilated(w, dil, g, causal, off):
    def f(b, h, q, k):
        p = q + off
        du = p // g - k // g
        if causal:
            return k <= p and 0 <= du < w * dil and du % dil == 0
        return abs(du) < w * dil and du % dil == 0
    return f


def o_strided(s, lw, g, causal, off):
    def f(b, h, q, k):
        d = q + off - k
        shard = (k // g) % s == h % s
        if causal:
            return d >= 0 and (shard or d < lw)
        return shard or abs(d) < lw
    return f


def o_power(g, local, causal, off):
    def f(b, h, q, k):
        p = q + off
        du = p // g - k // g
        if causal:
            return k <= p and (du < local or is_pow2_or_zero(du))
        return abs(du) < local or is_pow2_or_zero(abs(du))
    return f


def o_block_local(blk, causal, off):
    def f(b, h, q, k):
        p = q + off
        return p // blk == k // blk and (not causal or k <= p)
    return f


def o_global(n, off):
    return lambda b, h, q, k: k < n or q + off < n


def o_longlora(grp, nh, causal):
    def f(b, h, q, k):
        sh = grp // 2 if h >= nh // 2 else 0
        return (q + sh) // grp == (k + sh) // grp and (not causal or k <= q)
    return f


def o_random(table: torch.Tensor, sq, skv, blk, per_head):
    rows = table.tolist()

    def f(b, h, q, k):
        if q >= sq or k >= skv:
            return False
        return k // blk in rows[h if per_head else 0][q // blk]
    return f


def o_bigbird(sq, skv, blk, ng, wb, table, per_head):
    rows = None if table is None else table.tolist()

    def f(b, h, q, k):
        if q >= sq or k >= skv:
            return False
        if k < ng * blk or q < ng * blk or abs(q // blk - k // blk) <= wb // 2:
            return True
        return rows is not None and k // blk in rows[h if per_head else 0][q // blk]
    return f


def o_document(q_lens, kv_lens=None):
    q_doc = [i for i, n in enumerate(q_lens) for _ in range(n)]
    kv_doc = [i for i, n in enumerate(kv_lens if kv_lens is not None else q_lens) for _ in range(n)]
    return lambda b, h, q, k: q < len(q_doc) and k < len(kv_doc) and q_doc[q] == kv_doc[k]


def o_document_ids(q_ids, kv_ids=None):
    kv_ids = q_ids if kv_ids is None else kv_ids
    return lambda b, h, q, k: q < len(q_ids) and k < len(kv_ids) and q_ids[q] == kv_ids[k]


def o_per_head_window(windows, causal, off):
    def f(b, h, q, k):
        d = q + off - k
        w = windows[h]
        return 0 <= d < w if causal else abs(d) < w
    return f


def axis_neighbours(i: int, L: int, k: int, dil: int, s: int, causal: bool) -> set[int]:
    """Keys of query coordinate i along one axis, by listing its dilation class and picking the window."""
    cls = list(range(i % dil, L, dil))
    c = cls.index(i)
    n = len(cls)
    if causal:
        leader = min((c // s) * s + s - 1, n - 1)
        return {cls[j] for j in range(n) if leader - k < j <= c}
    leader = min((c // s) * s + s // 2, n - 1)
    start = min(max(leader - k // 2, 0), n - k)
    return set(cls[start:start + k])


def unflatten(idx: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(grid):
        out.append(idx % size)
        idx //= size
    return tuple(reversed(out))


def o_neighborhood(grid, ks, ds, ss, cs):
    grid = tuple(grid)
    n = 1
    for g in grid:
        n *= g
    tables = [[axis_neighbours(i, L, k, d, s, c) for i in range(L)]
              for L, k, d, s, c in zip(grid, ks, ds, ss, cs, strict=True)]

    def f(b, h, q, k):
        if q >= n or k >= n:
            return False
        qc, kc = unflatten(q, grid), unflatten(k, grid)
        return all(kc[a] in tables[a][qc[a]] for a in range(len(grid)))
    return f


def o_radial(nf, tpf, mw, sink):
    def f(b, h, q, k):
        if q >= nf * tpf or k >= nf * tpf:
            return False
        fq, sq_, fk, sk = q // tpf, q % tpf, k // tpf, k % tpf
        if fk < sink:
            return True
        df = abs(fq - fk)
        if df <= 1:
            return True
        r = df.bit_length()  # df in [2^(r-1), 2^r)
        return abs(sq_ - sk) < max(mw, tpf >> r)
    return f


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], M.MaskMod]
    oracle: Callable[[], Oracle]
    B: int
    H: int
    Q: int
    K: int
    exact: bool  # bounds exact on every rectangle
    granularity: int = 1  # block-aligned exactness uses multiples of this


SHAPES = [(1, 1), (7, 7), (33, 33), (70, 70), (5, 130), (33, 70)]


def _offsets(Q: int, K: int) -> list[int]:
    return sorted({0, K - Q, 3, -2})


def _cases() -> list[Case]:
    out: list[Case] = []

    def add(cid, make, oracle, Q, K, *, B=1, H=1, exact=True, granularity=1):
        out.append(Case(cid, make, oracle, B, H, Q, K, exact, granularity))

    for Q, K in SHAPES:
        add(f"full-{Q}x{K}", M.full, o_full, Q, K)
        for off in _offsets(Q, K):
            add(f"causal-o{off}-{Q}x{K}", lambda o=off: M.causal(offset=o), lambda o=off: o_causal(o), Q, K)
            add(f"global-3-o{off}-{Q}x{K}", lambda o=off: M.global_tokens(3, offset=o),
                lambda o=off: o_global(3, o), Q, K)
        for (w, c), off in itertools.product([(1, True), (4, True), (9, False), (200, True)], _offsets(Q, K)[:2]):
            add(f"sliding-{w}-{c}-o{off}-{Q}x{K}", lambda w=w, c=c, o=off: M.sliding_window(w, causal=c, offset=o),
                lambda w=w, c=c, o=off: o_sliding(w, c, o), Q, K)
        for ns, w in [(0, 3), (1, 1), (4, 6)]:
            off = K - Q
            add(f"sinks-{ns}-{w}-o{off}-{Q}x{K}", lambda ns=ns, w=w, o=off: M.sinks(ns, w, offset=o),
                lambda ns=ns, w=w, o=off: o_sinks(ns, w, o), Q, K)
        for blk, c in [(1, True), (5, True), (8, False)]:
            for off in _offsets(Q, K)[:2]:
                add(f"block_local-{blk}-{c}-o{off}-{Q}x{K}", lambda b_=blk, c=c, o=off: M.block_local(b_, causal=c,
                                                                                                      offset=o),
                    lambda b_=blk, c=c, o=off: o_block_local(b_, c, o), Q, K)
        for w, dil, g, c in [(3, 2, 1, True), (2, 3, 4, True), (4, 1, 2, False), (3, 2, 3, False), (1, 5, 1, True)]:
            off = K - Q
            add(f"dilated-{w}-{dil}-g{g}-{c}-{Q}x{K}", lambda w=w, d=dil, g=g, c=c, o=off: M.dilated(
                w, d, granularity=g, causal=c, offset=o), lambda w=w, d=dil, g=g, c=c, o=off: o_dilated(w, d, g, c, o),
                Q, K, granularity=g)
        for s, lw, g, c in [(3, 0, 1, True), (2, 4, 4, True), (4, 2, 2, False), (1, 0, 1, True), (3, 5, 1, False)]:
            off = K - Q
            add(f"strided-{s}-{lw}-g{g}-{c}-{Q}x{K}", lambda s=s, lw=lw, g=g, c=c, o=off: M.strided(
                s, local_window=lw, granularity=g, causal=c, offset=o),
                lambda s=s, lw=lw, g=g, c=c, o=off: o_strided(s, lw, g, c, o), Q, K, H=4, granularity=g)
        for g, loc, c in [(1, 1, True), (2, 3, True), (4, 0, False), (1, 5, False), (3, 4, True)]:
            off = K - Q
            add(f"power-g{g}-l{loc}-{c}-{Q}x{K}", lambda g=g, loc=loc, c=c, o=off: M.power(
                granularity=g, local=loc, causal=c, offset=o), lambda g=g, loc=loc, c=c, o=off: o_power(g, loc, c, o),
                Q, K, granularity=g)
        for grp, nh, c in [(4, 4, True), (7, 3, False), (1, 2, True)]:
            add(f"longlora-{grp}-{nh}-{c}-{Q}x{K}", lambda grp=grp, nh=nh, c=c: M.longlora_shifted(grp, nh, causal=c),
                lambda grp=grp, nh=nh, c=c: o_longlora(grp, nh, c), Q, K, H=nh)
        for wins, c in [([1, 4, 9], True), ([2, 5], False)]:
            off = K - Q
            add(f"per_head_window-{wins}-{c}-{Q}x{K}", lambda w=tuple(wins), c=c, o=off: M.per_head_window(
                list(w), causal=c, offset=o), lambda w=tuple(wins), c=c, o=off: o_per_head_window(w, c, o), Q, K,
                H=len(wins))

    # length-aware patterns: grids a bit larger than the declared lengths to cover out-of-range indices
    for lens, kv_lens, Q, K in [([3, 0, 5, 4], None, 14, 14), ([1], None, 1, 1), ([7, 7, 7, 7, 5], None, 33, 33),
                                ([10, 0, 23, 30], [5, 9, 0, 40], 70, 56), ([0, 0, 4], [3, 0, 4], 7, 9)]:
        add(f"document-{lens}-{kv_lens}", lambda a=tuple(lens), kv=kv_lens: M.document(
            list(a), kv_seq_lens=None if kv is None else list(kv)), lambda a=tuple(lens), kv=kv_lens: o_document(a, kv),
            Q, K)
    for q_ids, kv_ids, exact in [([0, 0, 2, 2, 2, 5], None, True), ([1, 1, 2, 3, 3], [0, 1, 1, 3, 4, 4, 4], True),
                                 ([3, 1, 3, 2, 1], [1, 2, 3, 3], False)]:
        add(f"document_ids-{q_ids}-{kv_ids}", lambda q=tuple(q_ids), kv=kv_ids: M.document_ids(
            torch.tensor(q), None if kv is None else torch.tensor(kv)),
            lambda q=tuple(q_ids), kv=kv_ids: o_document_ids(q, kv), 8, 9, exact=exact)
    # random-block bounds are exact for rectangles spanning <= 16 query blocks; block 1 over 33 rows is wider
    for sq, skv, blk, nr, nh, Q, K, exact in [
        (30, 30, 4, 2, None, 33, 33, True), (33, 70, 8, 3, 2, 33, 70, True), (7, 130, 16, 9, 3, 7, 130, True),
        (1, 1, 1, 1, None, 1, 1, True), (64, 64, 8, 1, 2, 70, 70, True), (33, 33, 1, 3, None, 33, 33, False),
        (20, 29, 8, 4, None, 22, 33, True),  # every kv block drawn: the partial last block must stop at seq_kv
    ]:
        def make_rb(sq=sq, skv=skv, blk=blk, nr=nr, nh=nh):
            return M.random_blocks(sq, skv, blk, nr, seed=7, num_heads=nh)

        add(f"random_blocks-{sq}-{skv}-{blk}-{nr}-{nh}", make_rb,
            lambda m=make_rb, sq=sq, skv=skv, blk=blk, nh=nh: o_random(m().table, sq, skv, blk, nh is not None),
            Q, K, H=nh or 1, exact=exact)
    for sq, skv, blk, ng, wb, nr, nh, Q, K in [(30, 30, 4, 1, 3, 2, None, 33, 33), (64, 40, 8, 0, 1, 1, 2, 70, 40),
                                               (7, 7, 2, 2, 5, 0, None, 7, 7), (50, 50, 5, 1, 3, 3, None, 50, 50)]:
        def make_bb(sq=sq, skv=skv, blk=blk, ng=ng, wb=wb, nr=nr, nh=nh):
            return M.bigbird(sq, skv, blk, num_global_blocks=ng, window_blocks=wb, num_random=nr, seed=3,
                             num_heads=nh)

        def oracle_bb(sq=sq, skv=skv, blk=blk, ng=ng, wb=wb, nr=nr, nh=nh):
            table = M.random_blocks(sq, skv, blk, nr, seed=3, num_heads=nh).table if nr else None
            return o_bigbird(sq, skv, blk, ng, wb, table, nh is not None)

        add(f"bigbird-{sq}-{skv}-{blk}-{ng}-{wb}-{nr}-{nh}", make_bb, oracle_bb, Q, K, H=nh or 1, exact=False)
    for grid, ks, ds, ss, cs in [
        ((33,), (5,), (1,), (1,), (False,)), ((33,), (4,), (1,), (3,), (False,)), ((30,), (7,), (1,), (7,), (False,)),
        ((33,), (5,), (1,), (2,), (True,)), ((31,), (3,), (4,), (2,), (False,)), ((29,), (4,), (3,), (1,), (True,)),
        ((1,), (1,), (1,), (1,), (False,)), ((7, 9), (3, 5), (1, 1), (1, 1), (False, False)),
        ((8, 8), (3, 3), (2, 1), (1, 3), (False, True)), ((6, 11), (6, 4), (1, 2), (3, 4), (True, False)),
        ((3, 4, 5), (2, 3, 3), (1, 1, 1), (1, 2, 1), (True, False, False)), ((4, 3, 5), (3, 3, 2), (1, 1, 2),
                                                                             (2, 1, 1), (False, False, True)),
    ]:
        n = 1
        for g in grid:
            n *= g
        exact = len(grid) == 1 and ds[0] == 1
        add(f"neighborhood-{grid}-k{ks}-d{ds}-s{ss}-c{cs}", lambda g=grid, k=ks, d=ds, s=ss, c=cs: M.neighborhood(
            g if len(g) > 1 else g[0], k, dilation=d, stride=s, causal=c),
            lambda g=grid, k=ks, d=ds, s=ss, c=cs: o_neighborhood(g, k, d, s, c), min(n + 3, 70), min(n + 3, 70),
            exact=exact)
    for nf, tpf, mw, sink in [(9, 7, 1, 0), (6, 8, 2, 1), (1, 5, 1, 0), (17, 4, 1, 2), (5, 13, 3, 5)]:
        n = nf * tpf
        add(f"radial-{nf}-{tpf}-{mw}-{sink}", lambda a=nf, t=tpf, m=mw, s=sink: M.radial(
            a, t, min_window=m, sink_frames=s), lambda a=nf, t=tpf, m=mw, s=sink: o_radial(a, t, m, s),
            min(n + 2, 70), min(n + 2, 70), exact=False, granularity=tpf)
    return out


CASES = _cases()
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"


def first_mismatch(got: torch.Tensor, ref: torch.Tensor) -> str:
    """Readable summary of where two [B, H, Q, KV] bool masks differ (for assertion messages)."""
    idx = torch.nonzero(got != ref)
    if not idx.numel():
        return "no mismatch"
    b, h, q, k = idx[0].tolist()
    return f"{idx.shape[0]} mismatches, first at b={b} h={h} q={q} kv={k}: got {bool(got[b, h, q, k])}"
