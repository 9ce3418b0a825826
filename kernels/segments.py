"""The per-step LoRA segment table, built once per forward step and shared by every layer.

The table proper (starts, slots, ranks and their host copies) serves every kernel; each
kernel family also needs its own index layout, built only when asked for (`layouts`):
"torch" (torch_ops: grouped_mm offsets, per-token slots, the padded bmm layout) and
"triton" (triton_sgmv: the BLOCK_M tile tables). An engine builds only its backend's.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .upload import upload

# Token-tile heights (BLOCK_M) the Triton kernels may pick; a tile table is prebuilt for each
# so that a launch's grid is exactly the number of non-empty tiles (no idle programs).
TILE_SIZES: tuple[int, ...] = (16, 32, 64)
# The torch kernels run over the pool window [first active slot, last active slot] as a view
# while it holds at most this many slots per active one; past that (a large pool, the step's
# adapters spread over it) they gather the active slots' weights instead. Gathering copies S
# slots (read + write, then read by the GEMM); running over the window reads W: measured on CPU
# at decode, the window won at W = 2 S and lost at W = 4 S (loadtest/bench_kernels.py --pool).
WINDOW_SLACK = 3.0
LAYOUTS: tuple[str, ...] = ("torch", "triton")


@dataclass(frozen=True, eq=False)  # identity semantics: fields are tensors
class LoraSegments:
    """The per-step segment table.

    Tokens [0, num_tokens) of the flat batch are sorted so each adapter slot's tokens are
    contiguous; segments are in ascending slot order, each slot at most once; tokens at index
    >= num_tokens are base-only and never touched by LoRA ops.

    Device tensors (all int32, all views into one buffer uploaded in a single copy):
      starts        [S+1]  token offset where segment i starts; starts[S] == num_tokens
      slots         [S]    pool slot of segment i (strictly ascending)
      ranks         [S]    true adapter rank of segment i (<= the pool's padded rank R)
    "torch" layout (None unless built):
      slot_offsets  [num_slots]  cumulative END token offset per pool slot (empty slots repeat
                    the previous value): the `offs` argument of torch grouped_mm when the
                    whole slot pool is the 3D operand
      token_slots   [num_tokens]  pool slot of every LoRA token (for gather formulations)
      pad_rows      [W*L]  the padded layout used by the CPU bmm path, L = max_seg_len rows per
                    entry; entry w*L+j is the token row of the j-th token of entry w, or 0 where
                    it has fewer tokens. The W entries are either the pool window (the slots from
                    the first to the last active one: `pad_window` is (lo, hi), the weights are a
                    view) or, when that window is mostly idle slots (a large pool), the S active
                    segments themselves (`pad_window` None: the kernel gathers their weights)
      pad_valid     [num_tokens]  where each LoRA token sits in that padded layout
                    (both None when padding would more than `max_padding`-fold the rows)
    Host value `compact`: the pool window holds more than WINDOW_SLACK x S slots, so the torch
    kernels gather the active slots' weights rather than touch every slot in the window.
    "triton" layout (None / empty unless built):
      tiles         [2*n]  (segment, first token) pairs, one per BLOCK_M-token tile, for each
                    BLOCK_M in TILE_SIZES back to back; see `tile_range`
    Host values: num_tokens, max_seg_len, max_rank, min_rank, num_segments, num_slots, and the
    same table as Python tuples (seg_starts/seg_slots/seg_ranks) for host-side loops.
    """

    starts: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor
    num_tokens: int
    max_seg_len: int
    max_rank: int
    min_rank: int
    num_segments: int
    num_slots: int
    seg_starts: tuple[int, ...]
    seg_slots: tuple[int, ...]
    seg_ranks: tuple[int, ...]
    layouts: tuple[str, ...] = LAYOUTS  # which of the layouts below were built
    slot_offsets: torch.Tensor | None = field(repr=False, default=None)
    token_slots: torch.Tensor | None = field(repr=False, default=None)
    tiles: torch.Tensor | None = field(repr=False, default=None)
    # ((BLOCK_M, first pair index, number of tiles), ...) into `tiles`
    tile_index: tuple[tuple[int, int, int], ...] = field(repr=False, default=())
    # the same as prebuilt views ((BLOCK_M, pairs [2*n], n), ...): no slicing per launch
    tile_views: tuple[tuple[int, torch.Tensor, int], ...] = field(repr=False, default=())
    pad_rows: torch.Tensor | None = field(repr=False, default=None)
    pad_valid: torch.Tensor | None = field(repr=False, default=None)
    compact: bool = False

    @property
    def device(self) -> torch.device:
        return self.starts.device

    @property
    def is_empty(self) -> bool:
        return self.num_tokens == 0

    def tile_range(self, block_m: int) -> tuple[torch.Tensor, int]:
        """The (segment, first token) int32 pairs [2*n] for tiles of `block_m` tokens, and n."""
        self.require("triton")
        for bm, pairs, count in self.tile_views:
            if bm == block_m:
                return pairs, count
        raise ValueError(f"no tile table for BLOCK_M={block_m}; have {TILE_SIZES}")

    def require(self, layout: str) -> None:
        """Raise unless the table was built with `layout` (a kernel asking for another backend's)."""
        if layout not in self.layouts:
            raise ValueError(f"this segment table was built for {self.layouts}, not for the {layout!r} kernels")

    @staticmethod
    def build(seg_lens: Sequence[int], seg_slots: Sequence[int], seg_ranks: Sequence[int],
              num_slots: int, device: torch.device | str, max_padding: float = 2.0,
              layouts: Sequence[str] = LAYOUTS, window_only: bool = False) -> "LoraSegments":
        """Build the table from host lists (one entry per segment, ascending slots).

        seg_lens[i] > 0 tokens for slot seg_slots[i] (strictly ascending, < num_slots), adapter
        rank seg_ranks[i] >= 0. Empty lists give the empty table (all LoRA ops are no-ops).
        max_padding: build the padded layout (pad_rows/pad_valid) only when S*L (segments x the
        longest) is at most this many times num_tokens (decode-like steps; long uneven prefills skip it).
        layouts: the kernel layouts to build (a subset of LAYOUTS; default both, for tests).
        window_only: never compact (the layout before large pools; benchmarks compare it).
        Cost: O(S) + "torch" O(tokens + W*L) + "triton" O(tokens/16) host work, one host->device copy.
        """
        layouts = tuple(layouts)
        if not set(layouts) <= set(LAYOUTS):
            raise ValueError(f"layouts must be a subset of {LAYOUTS}, got {layouts}")
        want_torch, want_triton = "torch" in layouts, "triton" in layouts
        lens = [int(v) for v in seg_lens]
        slots = [int(v) for v in seg_slots]
        ranks = [int(v) for v in seg_ranks]
        if not (len(lens) == len(slots) == len(ranks)):
            raise ValueError("seg_lens, seg_slots, seg_ranks must have equal length")
        if any(n <= 0 for n in lens):
            raise ValueError(f"segment lengths must be > 0, got {lens}")
        if any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be >= 0, got {ranks}")
        if any(b <= a for a, b in zip(slots, slots[1:])):
            raise ValueError(f"slots must be strictly ascending, got {slots}")
        if slots and (slots[0] < 0 or slots[-1] >= num_slots):
            raise ValueError(f"slots must lie in [0, {num_slots}), got {slots}")

        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        num_tokens = starts[-1]

        # Plain Python into one int32 array, then a single upload: at decode/prefill sizes
        # (T <= 4096) this measured several times cheaper than a chain of small torch CPU ops.
        buf = array("i", starts)
        buf.extend(slots)
        buf.extend(ranks)
        n_offsets = n_token_slots = 0
        if want_torch:
            ends = [0] * num_slots
            for slot, end in zip(slots, starts[1:]):
                ends[slot] = end
            for i in range(1, num_slots):  # empty slots end where the previous one ended
                if ends[i] < ends[i - 1]:
                    ends[i] = ends[i - 1]
            buf.extend(ends)
            for slot, n in zip(slots, lens):
                buf.extend([slot] * n)
            n_offsets, n_token_slots = num_slots, num_tokens
        tile_index, first = [], 0
        if want_triton:
            for bm in TILE_SIZES:
                count = 0
                for i, (s, n) in enumerate(zip(starts, lens)):
                    for m0 in range(s, s + n, bm):
                        buf.append(i)
                        buf.append(m0)
                    count += (n + bm - 1) // bm
                tile_index.append((bm, first, count))
                first += count
        pad_len = 0
        compact = bool(slots) and not window_only and slots[-1] - slots[0] + 1 > WINDOW_SLACK * len(slots)
        if want_torch and slots:
            width = len(slots) if compact else slots[-1] - slots[0] + 1
            seg_len = max(lens)
            # The padding that matters is the active segments' (uneven lengths); idle window
            # slots are bounded by WINDOW_SLACK (window_only: the rule before large pools).
            if (width if window_only else len(slots)) * seg_len <= max_padding * num_tokens:
                pad_len = width * seg_len
                rows = [0] * pad_len
                valid = array("i")
                for i, (slot, s, n) in enumerate(zip(slots, starts, lens)):
                    at = (i if compact else slot - slots[0]) * seg_len
                    rows[at:at + n] = range(s, s + n)
                    valid.extend(range(at, at + n))
                buf.extend(rows)
                buf.extend(valid)
        dev = upload(buf, torch.int32, device)  # buf always holds starts[0]
        views, at = [], 0
        for n in (len(starts), len(slots), len(ranks), n_offsets, n_token_slots, 2 * first,
                  pad_len, num_tokens if pad_len else 0):
            views.append(dev[at: at + n])
            at += n
        return LoraSegments(
            starts=views[0], slots=views[1], ranks=views[2], num_tokens=num_tokens,
            max_seg_len=max(lens, default=0), max_rank=max(ranks, default=0),
            min_rank=min(ranks, default=0),
            num_segments=len(lens), num_slots=int(num_slots),
            seg_starts=tuple(starts), seg_slots=tuple(slots), seg_ranks=tuple(ranks),
            layouts=layouts,
            slot_offsets=views[3] if want_torch else None, token_slots=views[4] if want_torch else None,
            tiles=views[5] if want_triton else None,
            tile_index=tuple(tile_index),
            tile_views=tuple((bm, views[5][2 * f: 2 * (f + n)], n) for bm, f, n in tile_index),
            pad_rows=views[6] if pad_len else None, pad_valid=views[7] if pad_len else None,
            compact=compact,
        )

    @staticmethod
    def empty(num_slots: int, device: torch.device | str, layouts: Sequence[str] = LAYOUTS) -> "LoraSegments":
        """The table of a step with no LoRA tokens."""
        return LoraSegments.build([], [], [], num_slots, device, layouts=layouts)


# --- the static table of a CUDA-graph decode step (server/engine/cuda_graphs.py) ----------------------
# A captured graph launches the Triton kernels with sizes fixed at capture, so its table has a
# fixed shape for its batch size: `size` segments over `size` token rows, one tile table of this
# BLOCK_M with `size` tiles. shrink_config / expand_config pick BLOCK_M 16 for it (one token per
# segment on average), and their other choices depend only on num_tokens / num_segments (= size)
# and the weights' shapes: fixed at capture too.
STATIC_BLOCK_M = 16


def static_len(size: int) -> int:
    """int32 entries of a static table of `size` rows: starts [size+1], slots, ranks, tiles [2*size]."""
    return 5 * size + 1


def fill_static(host, at: int, size: int, seg_lens: Sequence[int], seg_slots: Sequence[int],
                seg_ranks: Sequence[int]) -> None:
    """Write a static table into `host[at: at + static_len(size)]` (any mutable int sequence, e.g.
    a ctypes view of pinned memory): the step's segments (tokens, slot, rank; any slot order) first,
    then padded segments starting and ending at the step's LoRA token count with rank 0, and tiles
    of STATIC_BLOCK_M tokens followed by padded tiles that start at that count in the last (padded)
    segment, so they touch nothing. Host work O(size)."""
    n_seg = len(seg_lens)
    starts = [0]
    for n in seg_lens:
        starts.append(starts[-1] + n)
    end = starts[-1]
    if n_seg > size or end > size:
        raise ValueError(f"{n_seg} segments of {end} tokens do not fit a static table of {size}")
    pad = size - n_seg
    tiles = []
    for i in range(n_seg):
        for m0 in range(starts[i], starts[i + 1], STATIC_BLOCK_M):
            tiles += (i, m0)
    # more tiles than segments only if some segment is longer than one tile, hence n_seg < size
    tiles += (size - 1, end) * (size - len(tiles) // 2)
    host[at: at + static_len(size)] = starts + [end] * pad + list(seg_slots) + [0] * pad + list(seg_ranks) \
        + [0] * pad + tiles


def static_segments(table: torch.Tensor, size: int, num_slots: int) -> LoraSegments:
    """The triton-layout LoraSegments over a device int32 table [static_len(size)] that
    fill_static's layout is copied into each step (CUDA-graph decode). Its host values are not
    the step's: num_tokens = num_segments = size, min_rank 0 (the kernels read each segment's
    rank on the device and skip what is past it), max_rank 0 and no host tuples (nothing on the
    host may depend on the step's adapters: the graph is captured once)."""
    if table.dtype != torch.int32 or table.shape != (static_len(size),):
        raise ValueError(f"a static table of {size} rows is int32 [{static_len(size)}], got "
                         f"{table.dtype} {tuple(table.shape)}")
    tiles = table[3 * size + 1:]
    return LoraSegments(
        starts=table[:size + 1], slots=table[size + 1: 2 * size + 1], ranks=table[2 * size + 1: 3 * size + 1],
        num_tokens=size, max_seg_len=size, max_rank=0, min_rank=0, num_segments=size, num_slots=num_slots,
        seg_starts=(), seg_slots=(), seg_ranks=(), layouts=("triton",), tiles=tiles,
        tile_index=((STATIC_BLOCK_M, 0, size),), tile_views=((STATIC_BLOCK_M, tiles, size),))
