"""Paged KV cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables.

Policy-side only (plain ints, no tensors): the runner owns the cache tensors
`[num_layers, num_blocks * block_size, 2, kv_heads, head_dim]` and reads the block
tables this allocator hands out.
"""

from __future__ import annotations

from collections import deque

from server.engine.request import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold its next `num_new_tokens` tokens."""
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int, reserve: int = 0) -> bool:
        return len(self._free) - reserve >= num_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append enough blocks to `seq.block_table` for `num_new_tokens` more tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError("KV cache exhausted: the scheduler must check can_allocate first")
        seq.block_table.extend(self._free.popleft() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        # Recently freed blocks go to the front: they are likely still in CPU cache.
        self._free.extendleft(reversed(seq.block_table))
        seq.block_table = []
