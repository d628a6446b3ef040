"""BlockSparse: the block-level description of an attention mask that every kernel consumes.

Rows are query blocks, entries are kv blocks. For each (batch, head, query block) the kv-block list holds the
*full* blocks first (every element attended, no masking needed) and then the *partial* ones, whose exact
element mask is a bit tile (``block_q`` rows × ``block_kv // 32`` int32 words). Identical tiles (every causal
diagonal block, say) are stored once. Batch and head dimensions are 1 when the mask does not depend on them.

Blocks are *virtual*: block ``i`` covers tokens ``q_starts[i] : q_starts[i] + q_lens[i]``. For a plain batch
they tile the sequence; for packed variable-length batches (``cu_seqlens``) they restart at every sequence,
so no block straddles two sequences and no padding work is done.

Optionally a BlockSparse also holds *gathered columns* (``with_columns``): per (batch, head) a sorted list of kv
positions attended by every query at or after them (bottom-right causal: query i sees column c iff
c <= i + seq_kv - seq_q). The kept pairs are the blocks' pairs UNION those column pairs that lie outside the
query block's kept blocks (a column inside a kept block is governed by that block, never counted twice). Kernels
load columns by index, so their cost is proportional to the number of columns, not to the blocks they fall in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from longattn.masks.core import MaskFn, MaskMod, as_mask_mod, evaluate
from longattn.masks.patterns import full

EMPTY, PARTIAL, FULL = 0, 1, 2
TileFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (b, h, q_block, kv_block) -> packed bit tiles
_EVAL_CHUNK_ELEMS = 1 << 26  # elements of mask evaluated at once when resolving candidate blocks (bounds memory)


@dataclass
class Blocks1D:
    """Token ranges of the virtual blocks along one axis, and the sequence (document) each belongs to."""

    starts: Tensor  # int32 [n] first token of the block in the (packed) sequence
    lens: Tensor  # int32 [n] valid tokens in the block (< block size only at a sequence's tail)
    local: Tensor  # int64 [n] first token of the block relative to its own sequence
    seq: Tensor  # int64 [n] sequence index (0 for a plain batch)
    block: int
    total: int  # tokens along the axis
    multi_seq: bool = False  # blocks of more than one sequence (known on the host: checking seq never syncs)

    @staticmethod
    def plain(total: int, block: int, device) -> Blocks1D:
        starts = torch.arange(0, max(total, 1), block, device=device, dtype=torch.int64)[: math.ceil(total / block)]
        lens = (total - starts).clamp(max=block)
        return Blocks1D(starts.int(), lens.int(), starts, torch.zeros_like(starts), block, total)

    @staticmethod
    def packed(cu_seqlens: Tensor, block: int) -> Blocks1D:
        cu = cu_seqlens.to(torch.int64)
        lens_seq = cu[1:] - cu[:-1]
        nblk = (lens_seq + block - 1) // block
        seq = torch.repeat_interleave(torch.arange(len(lens_seq), device=cu.device), nblk)
        first = torch.cumsum(nblk, 0) - nblk
        local = (torch.arange(int(nblk.sum()), device=cu.device) - first[seq]) * block
        lens = (lens_seq[seq] - local).clamp(max=block)
        return Blocks1D((cu[seq] + local).int(), lens.int(), local, seq, block, int(cu[-1]),
                        bool((nblk[1:] > 0).any()))

    def __len__(self) -> int:
        return self.starts.numel()


class BlockLists(NamedTuple):
    """Padded per-row block lists: entries [B', H', rows, maxK], counts [B', H', rows], tile ids like entries."""

    indices: Tensor
    counts: Tensor
    full_counts: Tensor
    tile_ids: Tensor


@dataclass
class BlockSparse:
    """CSR block description of an attention mask (see module docstring). Build with the ``from_*`` methods."""

    kv_indices: Tensor  # int32 [B', H', nQB, maxK]: full entries first, then partial; padding undefined
    kv_counts: Tensor  # int32 [B', H', nQB]: entries in use
    full_counts: Tensor  # int32 [B', H', nQB]: leading entries that are full
    tile_ids: Tensor  # int32 [B', H', nQB, maxK]: bit tile of each partial entry, -1 for full
    tiles: Tensor  # int32 [T, block_q, block_kv // 32]: bit j of word w in row r is element (r, 32 w + j)
    q_blocks: Blocks1D
    kv_blocks: Blocks1D
    mask_mod: MaskMod | None = None  # the predicate it was built from, when known (for FlexAttention)
    columns: Tensor | None = None  # int32 [Bc', Hc', maxC]: gathered kv columns, ascending, padded with seq_kv
    column_counts: Tensor | None = None  # int32 [Bc', Hc']: columns in use
    _transposed: BlockLists | None = field(default=None, repr=False)
    _column_cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ shape facts
    @property
    def block_size(self) -> tuple[int, int]:
        return self.q_blocks.block, self.kv_blocks.block

    @property
    def seq_q(self) -> int:
        return self.q_blocks.total

    @property
    def seq_kv(self) -> int:
        return self.kv_blocks.total

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B', H', seq_q, seq_kv); B' and H' are 1 where the mask is shared."""
        bh = tuple(self.kv_counts.shape[:2])
        if self.column_counts is not None:
            bh = tuple(torch.broadcast_shapes(bh, tuple(self.column_counts.shape)))
        return (*bh, self.seq_q, self.seq_kv)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def varlen(self) -> bool:
        """Packed variable-length batch (blocks of more than one sequence on either axis)."""
        return self.q_blocks.multi_seq or self.kv_blocks.multi_seq

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_mask_mod(
        cls,
        mask_mod: MaskFn,
        B: int,
        H: int,
        seq_q: int,
        seq_kv: int,
        block: int | tuple[int, int] = (128, 128),
        *,
        device: torch.device | str | None = None,
        cu_seqlens_q: Tensor | None = None,
        cu_seqlens_kv: Tensor | None = None,
    ) -> BlockSparse:
        """Build from a mask_mod without materialising seq_q × seq_kv: block bounds classify most blocks,
        only undecided blocks are evaluated element by element (in chunks).

        With ``cu_seqlens_*`` the batch is packed (B must be 1): blocks restart at each sequence, the mask
        sees ``b`` = sequence index and sequence-local ``q_idx`` / ``kv_idx``, cross-sequence pairs are empty.
        """
        mask = as_mask_mod(mask_mod, "mask_mod")
        bq, bkv = _check_block(block)
        for name, v in (("B", B), ("H", H), ("seq_q", seq_q), ("seq_kv", seq_kv)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        qb, kb = _axis_blocks(seq_q, seq_kv, bq, bkv, device, cu_seqlens_q, cu_seqlens_kv, B)
        bi, hi = _bh_extent(mask, B, H, qb, device)
        b_idx = torch.arange(bi, device=device).view(-1, 1, 1, 1)
        h_idx = torch.arange(hi, device=device).view(1, -1, 1, 1)
        if qb.multi_seq or kb.multi_seq:  # packed: b is the sequence of the block
            b_idx = qb.seq.view(1, 1, -1, 1)
        any_, all_ = _block_bounds(mask, b_idx, h_idx, qb, kb)
        shape = (bi, hi, len(qb), len(kb))
        cls_map = torch.full(shape, PARTIAL, dtype=torch.int8, device=device)
        cls_map[~any_.expand(shape)] = EMPTY
        cls_map[all_.expand(shape)] = FULL
        return cls._finish(cls_map, mask, qb, kb)

    @classmethod
    def from_block_mask(
        cls,
        block_mask: Tensor,
        seq_q: int,
        seq_kv: int,
        block: int | tuple[int, int] = (128, 128),
        *,
        within: MaskFn | None = None,
        within_tiles: TileFn | None = None,
    ) -> BlockSparse:
        """Build from a bool block map [B', H', nQB, nKB] (True = attend the block); tail blocks are clipped to
        the sequence, and ``within`` (e.g. causal) further restricts the selected blocks elementwise. This is how
        dynamic methods hand their selection to the kernels. ``within_tiles(b, h, q_block, kv_block)`` (1-D index
        tensors) may return ``within``'s packed tiles on those blocks (int32 [n, block_q, block_kv // 32], zero
        outside the sequence) when the method knows a faster way than elementwise evaluation."""
        bq, bkv = _check_block(block)
        if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
            raise TypeError(f"block_mask: expected a 4-D bool tensor [B, H, nQB, nKB], got "
                            f"{getattr(block_mask, 'dtype', type(block_mask).__name__)} "
                            f"{tuple(getattr(block_mask, 'shape', ()))}")
        qb, kb = Blocks1D.plain(seq_q, bq, block_mask.device), Blocks1D.plain(seq_kv, bkv, block_mask.device)
        if block_mask.shape[2:] != (len(qb), len(kb)):
            raise ValueError(f"block_mask: expected block grid ({len(qb)}, {len(kb)}) for seq ({seq_q}, {seq_kv}) "
                             f"and block ({bq}, {bkv}), got {tuple(block_mask.shape[2:])}")
        cls_map = torch.where(block_mask, FULL, EMPTY).to(torch.int8)
        table = block_mask.contiguous()

        def in_selected_block(b, h, q, kv):
            t = table.to(q.device)
            return t[b % t.shape[0], h % t.shape[1], q // bq, kv // bkv]

        selected = MaskMod(in_selected_block, name="block_mask")
        if within is None:
            if within_tiles is not None:
                raise ValueError("within_tiles: packs the tiles of `within`, which was not given")
            return cls._finish(cls_map, selected, qb, kb)
        inner = as_mask_mod(within, "within")
        # Selected blocks are attended whole, so a selected block's elements are exactly ``within``'s: classify
        # ``within`` once over its own batch/head extents (one causal diagonal, not one per head), restricted
        # to blocks some row selects, and intersect.
        device = block_mask.device
        bi, hi = _bh_extent(inner, block_mask.shape[0], block_mask.shape[1], qb, device)
        any_, all_ = _block_bounds(inner, torch.arange(bi, device=device).view(-1, 1, 1, 1),
                                   torch.arange(hi, device=device).view(1, -1, 1, 1), qb, kb)
        wanted = block_mask.any(0, keepdim=True) if bi == 1 else block_mask
        wanted = wanted.any(1, keepdim=True) if hi == 1 else wanted
        inner_cls = torch.where(wanted & any_, torch.where(all_, FULL, PARTIAL), EMPTY).to(torch.int8)
        if within_tiles is None:
            inner_cls, inner_tiles, tiles = _resolve(inner_cls, _mask_tiles(inner, qb, kb), qb, kb)
        else:  # packed words are 1/32 of the bits elementwise evaluation holds: 8x larger slices, fewer syncs
            inner_cls, inner_tiles, tiles = _resolve(inner_cls, within_tiles, qb, kb, 8 * _EVAL_CHUNK_ELEMS)
        cls_map = torch.where(block_mask, inner_cls, EMPTY).to(torch.int8)
        tile_map = torch.where(block_mask, inner_tiles, -1).int()
        return cls(*_csr(cls_map, tile_map), tiles, qb, kb, selected & inner)

    @classmethod
    def from_block_lists(
        cls,
        kv_blocks: Tensor,
        seq_q: int,
        seq_kv: int,
        block: int | tuple[int, int] = (128, 128),
        *,
        within: MaskFn | ResolvedMask | None = None,
        trusted: bool = False,
    ) -> BlockSparse:
        """Build from per-query-block lists of kv blocks, int [B', H', nQB, K] (any order; duplicates and negative
        entries are ignored): what top-k methods select. Same result as ``from_block_mask`` on the equivalent map,
        but the work grows with the listed blocks, not with the nQB x nKB grid (at 128k with 32-token blocks the
        grid has 0.5 G entries per layer, a top-16 list 2 M). ``within`` restricts the listed blocks elementwise;
        as a ``ResolvedMask`` of this grid the listed blocks are classified by lookup, without reading anything
        back from the device. ``trusted`` skips the entry range check (one read-back) for lists the caller built.
        The CSR rows keep width K (entries past ``kv_counts`` are padding)."""
        bq, bkv = _check_block(block)
        if not isinstance(kv_blocks, Tensor) or kv_blocks.dtype not in (torch.int32, torch.int64) \
                or kv_blocks.dim() != 4:
            raise TypeError(f"kv_blocks: expected a 4-D int32/int64 tensor [B, H, nQB, K], got "
                            f"{getattr(kv_blocks, 'dtype', type(kv_blocks).__name__)} "
                            f"{tuple(getattr(kv_blocks, 'shape', ()))}")
        device = kv_blocks.device
        qb, kb = Blocks1D.plain(seq_q, bq, device), Blocks1D.plain(seq_kv, bkv, device)
        if kv_blocks.shape[2] != len(qb):
            raise ValueError(f"kv_blocks: expected {len(qb)} query blocks for seq_q={seq_q} and block {bq}, got "
                             f"{kv_blocks.shape[2]}")
        if not trusted and kv_blocks.numel() and int(kv_blocks.max()) >= len(kb):
            raise ValueError(f"kv_blocks: entries must be < {len(kb)} (kv blocks of seq_kv={seq_kv}, block {bkv}), "
                             f"got {int(kv_blocks.max())}")
        if isinstance(within, ResolvedMask):
            within.check_grid(seq_q, seq_kv, (bq, bkv), device)
        if kv_blocks.shape[-1] == 0:
            kv_blocks = torch.full((*kv_blocks.shape[:3], 1), -1, dtype=torch.long, device=device)
        lists = kv_blocks.long().sort(-1).values
        valid = lists >= 0
        valid[..., 1:] &= lists[..., 1:] != lists[..., :-1]
        # classify on the padded [B', H', nQB, K] grid itself (no compaction: query-side bounds broadcast, only the
        # listed kv blocks are gathered); the few undecided slots are then resolved to tiles
        kk = lists.clamp(min=0)
        b = torch.arange(lists.shape[0], device=device).view(-1, 1, 1, 1)
        h = torch.arange(lists.shape[1], device=device).view(1, -1, 1, 1)
        q_lo, q_len = qb.local.view(1, 1, -1, 1), qb.lens.view(1, 1, -1, 1)
        kv_lo, kv_len = kb.local[kk], kb.lens[kk]
        complete = (q_len == bq) & (kv_len == bkv)
        inner = within.mask if isinstance(within, ResolvedMask) else \
            full() if within is None else as_mask_mod(within, "within")
        any_, all_ = inner.block_bounds(b, h, q_lo, q_lo + q_len - 1, kv_lo, kv_lo + kv_len - 1)
        decided = all_ & complete
        if isinstance(within, ResolvedMask):
            undecided_cls, slot_tid = within.lookup(torch.arange(len(qb), device=device).view(1, 1, -1, 1), kk)
            slot_cls = torch.where(valid & any_, torch.where(decided, FULL, undecided_cls), EMPTY).to(torch.int8)
            slot_tid = torch.where(valid & any_ & ~decided, slot_tid, -1)
            tiles = within.tiles
        else:
            slot_cls = torch.where(valid & any_, torch.where(decided, FULL, PARTIAL), EMPTY).to(torch.int8)
            slot_cls, slot_tid, tiles = _resolve_slots(slot_cls, kk, inner, qb, kb)
        # CSR rows: full entries (ascending), then partial (ascending); empty slots sort last
        rank = torch.where(slot_cls == FULL, 0, torch.where(slot_cls == PARTIAL, 1, 2)).to(torch.int8)
        order = rank.argsort(dim=-1, stable=True)  # lists are ascending already
        used = slot_cls != EMPTY
        kv_indices = torch.where(used.gather(-1, order), lists.gather(-1, order), 0).int()
        return cls(kv_indices.contiguous(), used.sum(-1, dtype=torch.int32),
                   (slot_cls == FULL).sum(-1, dtype=torch.int32), slot_tid.gather(-1, order).contiguous(), tiles,
                   qb, kb, None)

    @classmethod
    def from_flex(cls, block_mask) -> BlockSparse:
        """Convert a torch FlexAttention ``BlockMask``; its partial blocks are evaluated with its mask_mod."""
        bq, bkv = block_mask.BLOCK_SIZE
        seq_q, seq_kv = block_mask.seq_lengths
        n_q, n_kv = math.ceil(seq_q / bq), math.ceil(seq_kv / bkv)
        device = block_mask.kv_indices.device
        pos = torch.arange(block_mask.kv_indices.shape[-1], device=device)

        def scatter(counts: Tensor, indices: Tensor, value: int, out: Tensor) -> None:
            valid = (pos < counts[..., None]) & (indices < n_kv)
            bb, hh, qq, ee = torch.nonzero(valid, as_tuple=True)
            out[bb, hh, qq, indices[bb, hh, qq, ee].long()] = value

        cls_map = torch.zeros((*block_mask.kv_num_blocks.shape[:2], n_q, n_kv), dtype=torch.int8, device=device)
        scatter(block_mask.kv_num_blocks[..., :n_q], block_mask.kv_indices[..., :n_q, :], PARTIAL, cls_map)
        if block_mask.full_kv_num_blocks is not None:
            scatter(block_mask.full_kv_num_blocks[..., :n_q], block_mask.full_kv_indices[..., :n_q, :], FULL, cls_map)
        qb, kb = Blocks1D.plain(seq_q, bq, device), Blocks1D.plain(seq_kv, bkv, device)
        return cls._finish(cls_map, as_mask_mod(block_mask.mask_mod), qb, kb)

    @classmethod
    def _finish(cls, cls_map: Tensor, mask: MaskMod, qb: Blocks1D, kb: Blocks1D) -> BlockSparse:
        """Resolve undecided blocks elementwise, dedup tiles, emit CSR."""
        cls_map, tile_map, tiles = _resolve(cls_map, _mask_tiles(mask, qb, kb), qb, kb)
        return cls(*_csr(cls_map, tile_map), tiles, qb, kb, mask)

    def with_columns(self, columns: Tensor) -> BlockSparse:
        """A copy that also attends the kept columns (bool [B', H', seq_kv], True = gathered for every causal query)
        outside the kept blocks (see module docstring). Plain (not packed) BlockSparse only."""
        if not isinstance(columns, Tensor) or columns.dtype != torch.bool or columns.dim() != 3:
            what = f"{getattr(columns, 'dtype', type(columns).__name__)} {tuple(getattr(columns, 'shape', ()))}"
            raise TypeError(f"columns: expected a 3-D bool tensor [B, H, seq_kv], got {what}")
        if columns.shape[-1] != self.seq_kv:
            raise ValueError(f"columns: expected {self.seq_kv} kv positions, got {columns.shape[-1]}")
        if self.varlen:
            raise ValueError("columns: gathered columns need a plain (not packed variable-length) BlockSparse")
        torch.broadcast_shapes(tuple(self.kv_counts.shape[:2]), tuple(columns.shape[:2]))  # raises if incompatible
        pos = torch.arange(self.seq_kv, device=columns.device, dtype=torch.int32)
        counts = columns.sum(-1, dtype=torch.int32)
        width = max(1, int(counts.max()))
        cols = torch.sort(torch.where(columns, pos, self.seq_kv), dim=-1).values[..., :width].contiguous()
        return BlockSparse(self.kv_indices, self.kv_counts, self.full_counts, self.tile_ids, self.tiles,
                           self.q_blocks, self.kv_blocks, self.mask_mod, cols.to(self.device),
                           counts.contiguous().to(self.device))

    def column_lists(self) -> tuple[Tensor, Tensor, Tensor]:
        """For the kernels: columns [Bc', Hc', maxC], per query block the number of leading columns any of its
        queries can see [Bc', Hc', nQB], and the kept-block bitmap [B', H', nQB, ceil(nKB / 32)] (int32 words,
        bit j of word w = kv block 32 w + j). Built once and cached."""
        if "lists" not in self._column_cache:
            cols, counts = self.columns, self.column_counts
            q_hi = (self.q_blocks.starts.long() + self.q_blocks.lens.long() - 1 + self.seq_kv - self.seq_q)
            ends = torch.searchsorted(cols.long().contiguous(), q_hi.expand(*cols.shape[:2], -1).contiguous(),
                                      right=True)
            ends = torch.minimum(ends, counts[..., None].long()).int().contiguous()
            self._column_cache["lists"] = (cols, ends, self._kept_bitmap())
        return self._column_cache["lists"]

    def _kept_bitmap(self) -> Tensor:
        """int32 [B', H', nQB, ceil(nKB / 32)]: bit set where the kv block is in the query block's list."""
        words = math.ceil(len(self.kv_blocks) / 32)
        pos = torch.arange(self.kv_indices.shape[-1], device=self.device)
        used = pos < self.kv_counts[..., None]
        idx = self.kv_indices.long()
        bits = torch.where(used, torch.ones_like(idx) << (idx % 32), 0)
        out = torch.zeros(*self.kv_counts.shape, words, dtype=torch.int64, device=self.device)
        out.scatter_add_(-1, torch.where(used, idx // 32, 0), bits)  # distinct bits per row: the sum is the OR
        return torch.where(out >= 1 << 31, out - (1 << 32), out).int().contiguous()

    def _column_pairs(self) -> Tensor:
        """Pairs the gathered columns add (outside kept blocks), float64 [B'', H''] over the broadcast shape."""
        if "pairs" not in self._column_cache:
            self._column_cache["pairs"] = self._count_column_pairs()
        return self._column_cache["pairs"]

    def _count_column_pairs(self) -> Tensor:
        cols, ends, kept = self.column_lists()
        bh = self.shape[:2]
        cols, ends = cols.expand(*bh, -1).long(), ends.expand(*bh, -1).long()
        kept = kept.expand(*bh, *kept.shape[2:])
        off = self.seq_kv - self.seq_q
        q_lo = self.q_blocks.starts.long() + off
        q_hi = q_lo + self.q_blocks.lens.long() - 1
        total = torch.zeros(bh, dtype=torch.float64, device=self.device)
        nq, width = len(self.q_blocks), cols.shape[-1]
        step = max(1, (1 << 24) // max(1, bh[0] * bh[1] * width))
        slot = torch.arange(width, device=self.device)
        kb = cols // self.kv_blocks.block  # padding (seq_kv) may point one past the last block: masked below
        kbc = kb.clamp(max=len(self.kv_blocks) - 1)
        for lo in range(0, nq, step):
            hi = min(nq, lo + step)
            word = torch.gather(kept[:, :, lo:hi], -1, (kbc // 32)[:, :, None, :].expand(-1, -1, hi - lo, -1))
            inside = ((word >> (kbc % 32)[:, :, None, :]) & 1) == 1
            rows = (q_hi[lo:hi].view(1, 1, -1, 1) - torch.maximum(cols[:, :, None, :], q_lo[lo:hi].view(1, 1, -1, 1))
                    + 1).clamp(min=0)
            use = (slot.view(1, 1, 1, -1) < ends[:, :, lo:hi, None]) & ~inside
            total += (rows * use).sum((-1, -2)).double()
        return total

    # ------------------------------------------------------------------ views
    def block_map(self) -> tuple[Tensor, Tensor]:
        """Dense block class map [B', H', nQB, nKB] (EMPTY/PARTIAL/FULL) and tile map (-1 where none)."""
        shape = (*self.kv_counts.shape, len(self.kv_blocks))
        cls_map = torch.zeros(shape, dtype=torch.int8, device=self.device)
        tile_map = torch.full(shape, -1, dtype=torch.int32, device=self.device)
        pos = torch.arange(self.kv_indices.shape[-1], device=self.device)
        used = pos < self.kv_counts[..., None]
        full = pos < self.full_counts[..., None]
        bb, hh, qq, ee = torch.nonzero(used, as_tuple=True)
        kk = self.kv_indices[bb, hh, qq, ee].long()
        cls_map[bb, hh, qq, kk] = torch.where(full[bb, hh, qq, ee], FULL, PARTIAL).to(torch.int8)
        tile_map[bb, hh, qq, kk] = self.tile_ids[bb, hh, qq, ee]
        return cls_map, tile_map

    def transposed(self) -> BlockLists:
        """The same blocks listed per kv block (CSC): entries are query blocks, full first, with the *same*
        (untransposed) tile ids. Used by the dK/dV backward kernel; built once and cached."""
        if self._transposed is None:
            cls_map, tile_map = self.block_map()
            self._transposed = BlockLists(*_csr(cls_map.transpose(2, 3), tile_map.transpose(2, 3)))
        return self._transposed

    def dense_rows(self, q_block_lo: int, q_block_hi: int) -> Tensor:
        """Element mask [B', H', rows, seq_kv] for query blocks [lo, hi) (rows = their valid tokens)."""
        code, table = self._element_lookup()
        el = table[code[:, :, q_block_lo:q_block_hi]]  # [B', H', nq, nKB, bq, bkv]
        el = el.permute(0, 1, 2, 4, 3, 5).reshape(*el.shape[:2], el.shape[2] * el.shape[4], -1)
        rows = _token_positions(self.q_blocks, q_block_lo, q_block_hi, self.q_blocks.block) >= 0
        cols = _token_positions(self.kv_blocks, 0, len(self.kv_blocks), self.kv_blocks.block) >= 0
        el = el[:, :, rows][..., cols]  # blocks tile the tokens in order, so valid slots are the tokens
        if self.columns is None:
            return el
        kept = (code[:, :, q_block_lo:q_block_hi] != 0)  # [B', H', nq, nKB]
        bq, bkv = self.block_size
        qpos = torch.arange(int(self.q_blocks.starts[q_block_lo]), int(self.q_blocks.starts[q_block_lo])
                            + el.shape[2], device=self.device)
        kv = torch.arange(self.seq_kv, device=self.device)
        inside = kept[:, :, (qpos - qpos[0]) // bq][..., kv // bkv]  # [B', H', rows, seq_kv]
        on_col = torch.zeros(*self.column_counts.shape, self.seq_kv + 1, dtype=torch.bool, device=self.device)
        on_col.scatter_(-1, self.columns.long(), True)
        causal = kv.view(1, -1) <= qpos.view(-1, 1) + self.seq_kv - self.seq_q
        return el | (on_col[..., None, : self.seq_kv] & causal & ~inside)

    def to_dense(self) -> Tensor:
        """Element mask [B', H', seq_q, seq_kv] (tests and small inputs only: O(seq_q × seq_kv) memory)."""
        return self.dense_rows(0, len(self.q_blocks))

    def _block_area(self) -> Tensor:
        """Valid query × key pairs of every block [nQB, nKB] (zero across sequences of a packed batch)."""
        area = self.q_blocks.lens.view(-1, 1).double() * self.kv_blocks.lens.view(1, -1).double()
        if self.varlen:
            area = area * (self.q_blocks.seq.view(-1, 1) == self.kv_blocks.seq.view(1, -1))
        return area

    def density(self) -> float:
        """Fraction of the query × key area the kernels compute (full + partial blocks): the retained work."""
        area, used, _ = self._slot_areas()
        kept = (area * used).sum() * self._bh_scale()
        if self.columns is not None:
            kept = kept + self._column_pairs().sum()
        return float(kept / (self._block_area().sum() * self.shape[0] * self.shape[1]))

    def mask_density(self) -> float:
        """Fraction of query × key pairs the mask keeps (exact: full blocks plus set bits of partial tiles).
        Computed once per instance: a static pattern's one BlockSparse serves every layer of a forward."""
        return float(self.kept_fraction)

    @functools.cached_property
    def kept_fraction(self) -> Tensor:
        """``mask_density`` as a 0-dim float64 tensor on the mask's device, computed without waiting on the
        device (a patched layer records it before its attention kernel; the number is read after the forward)."""
        area, used, full = self._slot_areas()
        ones = torch.cat([_ones_per_tile(self.tiles), self.tiles.new_zeros(1, dtype=torch.long)]).double()
        partial = torch.where(used & ~full, self.tile_ids.long(), len(self.tiles))  # other slots count 0 ones
        kept = ((area * full).sum() + ones[partial].sum()) * self._bh_scale()
        if self.columns is not None:
            kept = kept + self._column_pairs().sum()
        return kept / (self._block_area().sum() * self.shape[0] * self.shape[1])

    def _slot_areas(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per CSR slot [B', H', nQB, maxK]: its block's valid pairs (fp64), whether it is in use, whether full.
        Read off the lists (work ~ listed blocks), never the dense block map."""
        pos = torch.arange(self.kv_indices.shape[-1], device=self.device)
        used = pos < self.kv_counts[..., None]
        full = pos < self.full_counts[..., None]
        kv = self.kv_indices.long().clamp(0, len(self.kv_blocks) - 1)
        area = self.q_blocks.lens.view(-1, 1).double() * self.kv_blocks.lens[kv].double()
        if self.varlen:
            area = area * (self.q_blocks.seq.view(-1, 1) == self.kv_blocks.seq[kv])
        return area, used, full

    def _bh_scale(self) -> float:
        """Lists shared over batch/heads (B', H' = 1) stand for every (b, h) of the shape."""
        bh = self.shape[:2]
        return bh[0] * bh[1] / (self.kv_counts.shape[0] * self.kv_counts.shape[1])

    def to(self, device: torch.device | str) -> BlockSparse:
        """Copy to another device."""
        def move(x: Blocks1D) -> Blocks1D:
            return Blocks1D(x.starts.to(device), x.lens.to(device), x.local.to(device), x.seq.to(device),
                            x.block, x.total, x.multi_seq)
        return BlockSparse(self.kv_indices.to(device), self.kv_counts.to(device), self.full_counts.to(device),
                           self.tile_ids.to(device), self.tiles.to(device), move(self.q_blocks),
                           move(self.kv_blocks), self.mask_mod,
                           None if self.columns is None else self.columns.to(device),
                           None if self.column_counts is None else self.column_counts.to(device))

    def to_flex(self):
        """A torch FlexAttention ``BlockMask`` with the same blocks; partial blocks use the source mask_mod
        when known, else a lookup into our bit tiles."""
        from torch.nn.attention.flex_attention import BlockMask

        if self.varlen:
            raise ValueError("to_flex: packed variable-length BlockSparse has no FlexAttention equivalent; "
                             "build it with masks.document(...) on the packed sequence instead")
        if self.columns is not None:
            return self._blocks_with_columns().to_flex()
        # FlexAttention expects index rows as wide as the kv block count, and partial/full in separate lists.
        width = len(self.kv_blocks)
        pos = torch.arange(self.kv_indices.shape[-1], device=self.device)
        partial_idx = torch.where(pos >= self.full_counts[..., None], self.kv_indices, 0)
        order = torch.argsort((pos < self.full_counts[..., None]).int(), dim=-1, stable=True)
        pad = (0, width - self.kv_indices.shape[-1])
        partial_idx = torch.nn.functional.pad(torch.gather(partial_idx, -1, order), pad).contiguous()
        full_idx = torch.nn.functional.pad(self.kv_indices, pad).contiguous()
        partial_counts = (self.kv_counts - self.full_counts).contiguous()
        mask_mod = self.mask_mod if self.mask_mod is not None else self._tile_lookup_mask_mod()
        return BlockMask.from_kv_blocks(partial_counts, partial_idx, self.full_counts.contiguous(),
                                        full_idx, BLOCK_SIZE=self.block_size,
                                        mask_mod=mask_mod, seq_lengths=(self.seq_q, self.seq_kv))

    def _blocks_with_columns(self) -> BlockSparse:
        """The same pairs with the columns realised as bit tiles in the blocks they fall in (for FlexAttention and
        other block-only consumers; costs bit tiles proportional to those blocks)."""
        bh = self.shape[:2]
        cols, ends, _ = self.column_lists()
        cls_map, _ = self.block_map()
        extra = torch.zeros(*bh, len(self.q_blocks), len(self.kv_blocks) + 1, dtype=torch.bool, device=self.device)
        slot = torch.arange(cols.shape[-1], device=self.device)
        use = slot.view(1, 1, 1, -1) < ends.expand(*bh, -1)[..., None]
        kb = torch.where(use, (cols.long() // self.kv_blocks.block).expand(*bh, -1)[:, :, None, :],
                         len(self.kv_blocks))
        extra.scatter_(-1, kb, True)
        cls_map = cls_map.expand(*bh, -1, -1)
        cls_map = torch.where(extra[..., :-1] & (cls_map == EMPTY), PARTIAL, cls_map).to(torch.int8).contiguous()
        code, table = self._element_lookup()
        bq, bkv = self.block_size
        on_col = torch.zeros(*self.column_counts.shape, self.seq_kv + 1, dtype=torch.bool, device=self.device)
        on_col.scatter_(-1, self.columns.long(), True)
        off = self.seq_kv - self.seq_q

        def blocks_or_columns(b, h, q, kv):
            c = code[b % code.shape[0], h % code.shape[1], q // bq, kv // bkv]
            column = on_col[b % on_col.shape[0], h % on_col.shape[1], kv] & (kv <= q + off)
            return table[c, q % bq, kv % bkv] | (column & (c == 0))

        return BlockSparse._finish(cls_map, MaskMod(blocks_or_columns, name="blocks_or_columns"), self.q_blocks,
                                   self.kv_blocks)

    def packed_lookup(self) -> tuple[Tensor, Tensor]:
        """Per-block code [B', H', nQB, nKB] into a packed tile table [T + 2, bq, bkv // 32] (row 0 empty, 1 full,
        2+ the partial tiles): every block's element mask as packed bits, for lookups and for combining masks."""
        cls_map, tile_map = self.block_map()
        code = torch.where(cls_map == FULL, 1, torch.where(cls_map == PARTIAL, tile_map.long() + 2, 0))
        bq, bkv = self.block_size
        words = torch.zeros(2, bq, bkv // 32, dtype=torch.int32, device=self.device)
        words[1] = -1
        return code, torch.cat([words, self.tiles])

    def _element_lookup(self) -> tuple[Tensor, Tensor]:
        """``packed_lookup`` with the table unpacked to bool [T + 2, bq, bkv]."""
        code, table = self.packed_lookup()
        return code, unpack_bits(table, self.kv_blocks.block)

    def _tile_lookup_mask_mod(self) -> MaskMod:
        code, table = self._element_lookup()
        bq, bkv = self.block_size

        def block_sparse_tiles(b, h, q, kv):
            c = code[b % code.shape[0], h % code.shape[1], q // bq, kv // bkv]
            return table[c, q % bq, kv % bkv]

        return MaskMod(block_sparse_tiles)


# ---------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class ResolvedMask:
    """A batch- and head-independent mask whose undecided blocks (those its bounds cannot settle, and incomplete
    tail blocks) are resolved once for one block grid, so ``BlockSparse.from_block_lists`` classifies listed
    blocks by lookup instead of evaluating, deduplicating and compacting them on every call (ten device
    read-backs per call; the causal mask at 128k has ~6 k such blocks, reused by every layer). Build with
    ``ResolvedMask.build``."""

    mask: MaskMod
    seq_q: int
    seq_kv: int
    block: tuple[int, int]
    keys: Tensor  # int64 [n + 1]: ascending q_block * nKB + kv_block of the undecided blocks, then a sentinel
    classes: Tensor  # int8 [n + 1]: their class after elementwise evaluation (sentinel EMPTY)
    tile_ids: Tensor  # int32 [n + 1]: their bit tile, -1 unless PARTIAL
    tiles: Tensor  # int32 [T, block_q, block_kv // 32]

    @staticmethod
    def build(mask: MaskFn, seq_q: int, seq_kv: int, block: int | tuple[int, int] = (128, 128), *,
              device: torch.device | str = "cpu") -> ResolvedMask:
        """Resolve ``mask`` over the whole (seq_q, seq_kv) block grid; bounds are taken a slice of query blocks
        at a time, so the grid itself is never held (1 M tokens with 32-token blocks is 0.5 G blocks)."""
        bq, bkv = _check_block(block)
        inner = as_mask_mod(mask, "mask")
        qb, kb = Blocks1D.plain(seq_q, bq, device), Blocks1D.plain(seq_kv, bkv, device)
        if _bh_extent(inner, 2, 2, qb, qb.starts.device) != (1, 1):
            raise ValueError(f"mask: a resolved mask must not depend on batch or head, got {inner!r}")
        zero = torch.zeros(1, 1, dtype=torch.long, device=qb.starts.device)
        kv_lo, kv_hi = kb.local.view(1, -1), (kb.local + kb.lens - 1).view(1, -1)
        rows = max(1, _EVAL_CHUNK_ELEMS // max(1, len(kb)))
        keys = []
        for lo in range(0, len(qb), rows):
            q_lo, q_len = qb.local[lo:lo + rows].view(-1, 1), qb.lens[lo:lo + rows].view(-1, 1)
            any_, all_ = inner.block_bounds(zero, zero, q_lo, q_lo + q_len - 1, kv_lo, kv_hi)
            complete = (q_len == bq) & (kb.lens.view(1, -1) == bkv)
            undecided = (any_ & ~(all_ & complete)).expand(len(q_lo), len(kb))
            keys.append(undecided.flatten().nonzero().squeeze(1) + lo * len(kb))
        keys = torch.cat(keys)
        qq, kk = keys // len(kb), keys % len(kb)
        classes, tile_ids, tiles = _resolve_entries(torch.zeros_like(qq), torch.zeros_like(qq), qq, kk,
                                                    _mask_tiles(inner, qb, kb), qb, kb, _EVAL_CHUNK_ELEMS)
        sentinel = torch.tensor([len(qb) * len(kb)], device=keys.device)
        return ResolvedMask(inner, seq_q, seq_kv, (bq, bkv), torch.cat([keys, sentinel]),
                            torch.cat([classes, classes.new_zeros(1)]),
                            torch.cat([tile_ids, tile_ids.new_full((1,), -1)]), tiles)

    def check_grid(self, seq_q: int, seq_kv: int, block: tuple[int, int], device: torch.device) -> None:
        """Raise unless this was resolved for the same grid and device."""
        want = (seq_q, seq_kv, block, torch.device(device))
        have = (self.seq_q, self.seq_kv, self.block, self.keys.device)
        if want != have:
            raise ValueError(f"within: resolved for (seq_q, seq_kv, block, device) = {have}, used for {want}")

    def lookup(self, q_block: Tensor, kv_block: Tensor) -> tuple[Tensor, Tensor]:
        """(class, tile id) of undecided blocks (broadcast int64 indices); meaningless for decided ones."""
        n_kb = math.ceil(self.seq_kv / self.block[1])
        pos = torch.searchsorted(self.keys, (q_block * n_kb + kv_block).contiguous())
        pos = pos.clamp_(max=self.keys.numel() - 1)
        return self.classes[pos], self.tile_ids[pos]


def _resolve_slots(slot_cls: Tensor, kk: Tensor, mask: MaskMod, qb: Blocks1D,
                   kb: Blocks1D) -> tuple[Tensor, Tensor, Tensor]:
    """Settle the PARTIAL slots of a [B', H', nQB, K] list grid (kv block ``kk`` per slot) elementwise: the class
    grid (in place), the tile id grid (-1 unless PARTIAL) and the deduplicated tiles. Each distinct (query block,
    kv block) pair is evaluated once per batch/head the mask depends on."""
    device = slot_cls.device
    slot_tid = torch.full(slot_cls.shape, -1, dtype=torch.int32, device=device)
    bb, hh, qq, slot = (slot_cls == PARTIAL).nonzero(as_tuple=True)
    bi, hi = _bh_extent(mask, slot_cls.shape[0], slot_cls.shape[1], qb, device)
    pairs = len(qb) * len(kb)
    key = ((bb % bi) * hi + hh % hi) * pairs + qq * len(kb) + kk[bb, hh, qq, slot]
    uniq, inverse = torch.unique(key, return_inverse=True)
    u_cls, u_tid, tiles = _resolve_entries(uniq // pairs // hi, uniq // pairs % hi, uniq % pairs // len(kb),
                                           uniq % len(kb), _mask_tiles(mask, qb, kb), qb, kb, _EVAL_CHUNK_ELEMS)
    slot_cls[bb, hh, qq, slot], slot_tid[bb, hh, qq, slot] = u_cls[inverse], u_tid[inverse]
    return slot_cls, slot_tid, tiles


def _check_block(block: int | Sequence[int]) -> tuple[int, int]:
    bq, bkv = (block, block) if isinstance(block, int) else tuple(block)
    if not (isinstance(bq, int) and bq >= 16 and bq & (bq - 1) == 0):
        raise ValueError(f"block: expected a query block size that is a power of two >= 16, got {bq!r}")
    if not (isinstance(bkv, int) and bkv >= 32 and bkv & (bkv - 1) == 0):
        raise ValueError(f"block: expected a kv block size that is a power of two >= 32, got {bkv!r}")
    return bq, bkv


def _axis_blocks(seq_q, seq_kv, bq, bkv, device, cu_q, cu_kv, B) -> tuple[Blocks1D, Blocks1D]:
    if cu_q is None and cu_kv is None:
        return Blocks1D.plain(seq_q, bq, device), Blocks1D.plain(seq_kv, bkv, device)
    cu_kv = cu_q if cu_kv is None else cu_kv
    cu_q = cu_kv if cu_q is None else cu_q
    check_cu_seqlens("cu_seqlens_q", cu_q, seq_q)
    check_cu_seqlens("cu_seqlens_kv", cu_kv, seq_kv)
    if cu_q.numel() != cu_kv.numel():
        raise ValueError(f"cu_seqlens_kv: expected {cu_q.numel()} offsets like cu_seqlens_q, got {cu_kv.numel()}")
    if B != 1:
        raise ValueError(f"B: packed variable-length batches (cu_seqlens) need B=1, got {B}")
    return Blocks1D.packed(cu_q.to(device), bq), Blocks1D.packed(cu_kv.to(device), bkv)


def check_cu_seqlens(name: str, cu, total: int) -> None:
    """Raise unless ``cu`` is a 1-D int tensor of non-decreasing offsets from 0 to ``total``."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected a 1-D int32/int64 tensor of cumulative lengths, got "
                        f"{getattr(cu, 'dtype', type(cu).__name__)}")
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total}, got {cu.tolist()}")


def _bh_extent(mask: MaskMod, B: int, H: int, qb: Blocks1D, device) -> tuple[int, int]:
    """Batch and head extents the mask actually depends on (1 where it ignores b or h)."""
    probe = evaluate(mask, torch.arange(B, device=device).view(-1, 1, 1, 1),
                     torch.arange(H, device=device).view(1, -1, 1, 1),
                     torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),
                     torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device))
    bi = B if probe.dim() == 4 and probe.shape[0] == B else 1
    hi = H if probe.dim() == 4 and probe.shape[1] == H else 1
    if qb.multi_seq:
        bi = 1
    return bi, hi


def _block_bounds(mask: MaskMod, b: Tensor, h: Tensor, qb: Blocks1D, kb: Blocks1D) -> tuple[Tensor, Tensor]:
    """(any, all) of ``mask`` over every (query block, kv block) rectangle, in sequence-local coordinates."""
    q_lo, kv_lo = qb.local.view(1, 1, -1, 1), kb.local.view(1, 1, 1, -1)
    return mask.block_bounds(b, h, q_lo, q_lo + qb.lens.view(1, 1, -1, 1) - 1,
                             kv_lo, kv_lo + kb.lens.view(1, 1, 1, -1) - 1)


def _evaluate_blocks(mask: MaskMod, bb, hh, qq, kk, qb: Blocks1D, kb: Blocks1D) -> Tensor:
    """Elementwise mask of the listed blocks: bool [n, block_q, block_kv], False outside the sequences."""
    n, bq, bkv = bb.numel(), qb.block, kb.block
    out = torch.zeros(n, bq, bkv, dtype=torch.bool, device=bb.device)
    r = torch.arange(bq, device=bb.device).view(1, bq, 1)
    c = torch.arange(bkv, device=bb.device).view(1, 1, bkv)
    packed = qb.multi_seq or kb.multi_seq
    step = max(1, _EVAL_CHUNK_ELEMS // (bq * bkv))
    for lo in range(0, n, step):
        sl = slice(lo, lo + step)
        q_local, kv_local = qb.local[qq[sl]].view(-1, 1, 1), kb.local[kk[sl]].view(-1, 1, 1)
        b = qb.seq[qq[sl]].view(-1, 1, 1) if packed else bb[sl].view(-1, 1, 1).long()
        q_len, kv_len = qb.lens[qq[sl]].view(-1, 1, 1).long(), kb.lens[kk[sl]].view(-1, 1, 1).long()
        # Slots past a sequence's end are evaluated at its last token (masks may index tables) and dropped.
        m = evaluate(mask, b, hh[sl].view(-1, 1, 1).long(), q_local + torch.minimum(r, q_len - 1),
                     kv_local + torch.minimum(c, kv_len - 1))
        out[sl] = m & (r < q_len) & (c < kv_len)
    return out


def _mask_tiles(mask: MaskMod, qb: Blocks1D, kb: Blocks1D) -> TileFn:
    """Packed tiles of ``mask`` on listed blocks by elementwise evaluation (the generic way)."""
    return lambda b, h, q, k: pack_bits(_evaluate_blocks(mask, b, h, q, k, qb, kb))


def _resolve(cls_map: Tensor, tile_fn: TileFn, qb: Blocks1D, kb: Blocks1D,
             elems: int = _EVAL_CHUNK_ELEMS) -> tuple[Tensor, Tensor, Tensor]:
    """Settle the PARTIAL candidates of ``cls_map`` (in place) from their packed tiles and force incomplete blocks
    partial; returns the class map, the tile map (-1 where no tile) and the deduplicated bit tiles. ``elems``
    bounds the tile elements built per slice."""
    if qb.multi_seq or kb.multi_seq:
        cls_map[:, :, qb.seq.view(-1, 1) != kb.seq.view(1, -1)] = EMPTY
    # A full block must be complete: the kernel reads it without bounds checks.
    short = (qb.lens.view(-1, 1) < qb.block) | (kb.lens.view(1, -1) < kb.block)
    cls_map[(cls_map == FULL) & short.view(1, 1, *short.shape)] = PARTIAL
    bb, hh, qq, kk = torch.nonzero(cls_map == PARTIAL, as_tuple=True)
    tile_map = torch.full(cls_map.shape, -1, dtype=torch.int32, device=cls_map.device)
    classes, tile_ids, tiles = _resolve_entries(bb, hh, qq, kk, tile_fn, qb, kb, elems)
    cls_map[bb, hh, qq, kk] = classes
    tile_map[bb, hh, qq, kk] = tile_ids
    return cls_map, tile_map, tiles


def _resolve_entries(bb: Tensor, hh: Tensor, qq: Tensor, kk: Tensor, tile_fn: TileFn, qb: Blocks1D, kb: Blocks1D,
                     elems: int) -> tuple[Tensor, Tensor, Tensor]:
    """Class (int8) of each listed candidate block from its packed tile, its tile id (-1 unless PARTIAL) and the
    deduplicated tiles. Candidates are resolved a bounded slice at a time (token-exact masks at 128k have millions
    of them)."""
    n = bb.numel()
    classes = torch.empty(n, dtype=torch.int8, device=bb.device)
    tile_ids = torch.full((n,), -1, dtype=torch.int32, device=bb.device)
    step = max(1, elems // (qb.block * kb.block))
    parts = [torch.zeros(0, qb.block, kb.block // 32, dtype=torch.int32, device=bb.device)]
    n_tiles = 0
    for lo in range(0, n, step):
        sl = slice(lo, lo + step)
        q, k = qq[sl], kk[sl]
        words = tile_fn(bb[sl], hh[sl], q, k).flatten(1)  # bits outside the valid rows/columns are zero
        empty = (words == 0).all(1)
        full = (words == -1).all(1) & (qb.lens[q] == qb.block) & (kb.lens[k] == kb.block)
        classes[sl] = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
        keep = (~empty & ~full).nonzero().squeeze(1)  # one device sync serves the gather and the scatter
        tiles, inverse = _dedup_tiles(words[keep].view(-1, qb.block, kb.block // 32))
        ids = torch.full((words.shape[0],), -1, dtype=torch.int32, device=bb.device)
        ids[keep] = (inverse + n_tiles).int()
        tile_ids[sl] = ids
        parts.append(tiles)
        n_tiles += tiles.shape[0]
    tiles, remap = _dedup_tiles(torch.cat(parts)) if len(parts) > 2 else (parts[-1], None)
    if remap is not None:
        tile_ids = torch.where(tile_ids >= 0, remap.int()[tile_ids.clamp(min=0).long()], -1).int()
    return classes, tile_ids, tiles


def pack_bits(bits: Tensor) -> Tensor:
    """bool [n, R, C] -> int32 [n, R, C // 32] (bit j of word w = column 32 w + j). In int32 bit 31 is -2**31
    and the other bits sum to at most 2**31 - 1, so the sum is exact without widening."""
    n, r, c = bits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return (bits.view(n, r, c // 32, 32).int() << shifts).sum(-1, dtype=torch.int32)


def unpack_bits(tiles: Tensor, cols: int) -> Tensor:
    """int32 [T, R, C // 32] -> bool [T, R, C]."""
    shifts = torch.arange(32, device=tiles.device, dtype=torch.int32)
    bits = (tiles.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*tiles.shape[:2], cols).bool()


def _dedup_tiles(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct tiles (ordered by a content hash) and each input tile's index among them. Hashing turns the
    dedup into sorts of two int64 per tile instead of a row sort of whole tiles (seconds per layer at 128k for
    token-exact masks). Two independent hashes: one collides for ~1 pair in 2**31, which millions of tiles at
    128k do hit; every tile is still compared with its representative, and a collision falls back to the exact
    row sort. Hashing and checking go a bounded slice of tiles at a time (the 16-bit halves are 4x the tiles'
    bytes: tens of GB for millions of tiles at 128k)."""
    n = packed.shape[0]
    if n == 0:
        return packed, torch.zeros(0, dtype=torch.long, device=packed.device)
    flat = packed.view(n, -1)
    coef = _hash_coefficients(2 * flat.shape[1], packed.device)  # [2, halves], each < 2**31: sums stay < 2**63
    step = max(1, _EVAL_CHUNK_ELEMS // (2 * flat.shape[1]))
    hashes = torch.empty(2, n, dtype=torch.long, device=packed.device)
    for lo in range(0, n, step):
        part = flat[lo:lo + step]
        halves = torch.stack([part & 0xFFFF, (part >> 16) & 0xFFFF], -1).flatten(1).long()  # each < 2**16
        for i in range(2):
            hashes[i, lo:lo + step] = (halves * coef[i]).sum(1)
    order = torch.argsort(hashes[1], stable=True)
    order = order[torch.argsort(hashes[0, order], stable=True)]
    srt = hashes[:, order]
    new = torch.ones(n, dtype=torch.bool, device=packed.device)
    new[1:] = (srt[:, 1:] != srt[:, :-1]).any(0)
    inverse = torch.empty(n, dtype=torch.long, device=packed.device)
    inverse[order] = new.cumsum(0) - 1
    uniq = flat[order[new]]  # each group's first tile in input order (stable sorts)
    if not all(torch.equal(uniq[inverse[lo:lo + step]], flat[lo:lo + step]) for lo in range(0, n, step)):
        uniq, inverse = torch.unique(flat, dim=0, return_inverse=True)
    return uniq.view(-1, *packed.shape[1:]).contiguous(), inverse


def _ones_per_tile(tiles: Tensor) -> Tensor:
    """int64 [T]: set bits of each packed tile, counted on the words (SWAR popcount) a bounded slice at a time,
    never unpacked (a token-exact 128k mask has millions of tiles: unpacked, ~100 GB)."""
    flat = tiles.reshape(tiles.shape[0], math.prod(tiles.shape[1:]))
    out = torch.empty(flat.shape[0], dtype=torch.long, device=tiles.device)
    step = max(1, _EVAL_CHUNK_ELEMS // max(1, flat.shape[1]))
    for lo in range(0, flat.shape[0], step):
        x = flat[lo:lo + step].long() & 0xFFFFFFFF
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        out[lo:lo + step] = (((x * 0x01010101) & 0xFFFFFFFF) >> 24).sum(1)
    return out


@functools.cache
def _hash_coefficients(n: int, device: torch.device) -> Tensor:
    return torch.randint(1, 2**31 - 1, (2, n), generator=torch.Generator().manual_seed(0x7E57)).to(device)


def _csr(cls_map: Tensor, tile_map: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row: full blocks (ascending), then partial blocks (ascending); padded to the longest row with kv
    block 0 / tile -1. Each entry's slot is a running count, so this is two scans and a scatter, not a sort."""
    full, part = cls_map == FULL, cls_map == PARTIAL
    full_counts = full.sum(-1, dtype=torch.int32)
    kv_counts = full_counts + part.sum(-1, dtype=torch.int32)
    width = max(1, int(kv_counts.max())) if kv_counts.numel() else 1
    slot = torch.where(full, full.cumsum(-1) - 1,
                       torch.where(part, full_counts[..., None] + part.cumsum(-1) - 1, width))  # width: dropped
    col = torch.arange(cls_map.shape[-1], device=cls_map.device, dtype=torch.int32).expand(cls_map.shape)
    lead = cls_map.shape[:-1]
    kv_indices = torch.zeros(*lead, width + 1, dtype=torch.int32, device=cls_map.device).scatter_(-1, slot, col)
    tile_ids = torch.full((*lead, width + 1), -1, dtype=torch.int32, device=cls_map.device).scatter_(
        -1, slot, tile_map.expand(cls_map.shape).int())
    return (kv_indices[..., :width].contiguous(), kv_counts.contiguous(), full_counts.contiguous(),
            tile_ids[..., :width].contiguous())


def _token_positions(blocks: Blocks1D, lo: int, hi: int, block: int) -> Tensor:
    """Token index of every row slot of blocks [lo, hi), -1 for slots past a block's valid length."""
    r = torch.arange(block, device=blocks.starts.device).view(1, -1)
    starts, lens = blocks.starts[lo:hi].long().view(-1, 1), blocks.lens[lo:hi].long().view(-1, 1)
    return torch.where(r < lens, starts + r, -1).view(-1)
