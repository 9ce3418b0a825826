"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, and the prefix cache.

Policy-side only (plain ints, no tensors): the runner owns the cache tensors
`[num_layers, num_blocks * block_size, 2, kv_heads, head_dim]` and reads the block
tables this allocator hands out.

Prefix caching (as vLLM's automatic prefix caching): a block whose `block_size` tokens are all
computed is registered under a digest of everything its K/V depend on: the tokens before it (the
previous block's digest), its own tokens, and the sequence's cache namespace (its tenant and its
adapter version, or its mixture or route: an adapter's K/V differ from the base's; and the cache's
epoch when it was queued, which `forget_cached` ends). A sequence
admitted later whose prompt starts with the same blocks, in the same namespace, takes them
instead of computing them. A block no sequence holds stays cached until its space is needed:
free blocks holding nothing are used first, then cached ones, least recently freed first (a
sequence's tail before its head, which is likelier to be shared). Digests are SHA-256: a crafted
prompt cannot collide with another tenant's or another prompt's block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from itertools import islice

from server.engine.request import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def namespace_digest(seq: Sequence) -> bytes:
    """The digest "before" `seq`'s first block: what its K/V depend on besides its tokens (its
    tenant, and its adapter version, mixture or route; reprs of frozen dataclasses), and the
    cache's epoch when it arrived (`BlockAllocator.forget_cached`)."""
    r = seq.request
    return hashlib.sha256(repr((r.tenant, r.adapter, r.experts, seq.cache_epoch)).encode()).digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # holding nothing cached
        self._refs = [0] * num_blocks  # sequences holding each block
        self._cached: dict[bytes, int] = {}  # digest -> the block holding that content
        self._digest_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by none, oldest first
        self.epoch = 0  # bumped by forget_cached; a sequence's namespace holds the one it arrived in

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get: empty ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain to hold its next `num_new_tokens` tokens."""
        total = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, num_blocks: int, reserve: int = 0) -> bool:
        return self.num_free - reserve >= num_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append enough blocks to `seq.block_table` for `num_new_tokens` more tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free:
            raise RuntimeError("KV cache exhausted: the scheduler must check can_allocate first")
        for _ in range(need):
            block = self._free.popleft() if self._free else self._evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; the cached ones stay findable until their space is needed."""
        for block in reversed(seq.block_table):  # the tail first: evicted before the head
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._digest_of:
                self._evictable[block] = None
            else:
                self._free.appendleft(block)  # recently freed first: likely still in a CPU cache
        seq.block_table = []
        seq.num_cached_blocks = 0

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._digest_of.pop(block)]
        return block

    # --- the prefix cache ------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` (holding no blocks) can start with: its leading full blocks
        found in the cache, within its first num_tokens - 1 tokens (the last one is always
        computed: its logits give the next token). Host work O(blocks of the prompt) once per
        sequence, then O(hits)."""
        if not self.prefix_caching:
            return []
        n = (seq.num_tokens - 1) // self.block_size
        hits = []
        for digest in islice(self._digests(seq, n), n):
            block = self._cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def digests_completed(self, seq: Sequence, start: int, num_tokens: int) -> list[bytes]:
        """Digests of `seq`'s blocks that computing its tokens [start, start + num_tokens) fills
        (blocks of known tokens only); [] without prefix caching."""
        if not self.prefix_caching:
            return []
        first = start // self.block_size
        full = min(start + num_tokens, len(seq.token_ids)) // self.block_size
        return self._digests(seq, full)[first:full] if full > first else []

    def tokens_in_step(self, seq: Sequence, prefix: list[int], filling: set[bytes]) -> int:
        """Prompt tokens of `seq` right after its cached `prefix` (from `cached_prefix`) that the
        blocks the step fills (`filling`, their digests) will hold once it has run."""
        n = (seq.num_tokens - 1) // self.block_size  # the blocks `cached_prefix` looked up
        digests = seq.block_digests
        i = len(prefix)
        while i < n and digests[i] in filling:
            i += 1
        return (i - len(prefix)) * self.block_size

    def blocks_to_admit(self, seq: Sequence, prefix: list[int], num_new_tokens: int) -> int:
        """Free blocks that admitting `seq` with the cached `prefix` and `num_new_tokens` tokens
        after it uses up: its new blocks, and the prefix blocks no sequence holds."""
        new = blocks_for(len(prefix) * self.block_size + num_new_tokens, self.block_size) - len(prefix)
        return new + sum(1 for b in prefix if not self._refs[b])

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Give `seq` (holding no blocks) the cached prefix `blocks`: their tokens count as computed."""
        for block in blocks:
            if not self._refs[block]:
                del self._evictable[block]
            self._refs[block] += 1
        seq.block_table = list(blocks)
        seq.num_cached_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size

    def cache_computed(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that are now full of computed, known tokens (call after the step
        that computed them is launched: any later step reads them after it, in stream order). A
        block whose content another block already caches stays uncached (freed as it is)."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= seq.num_cached_blocks:
            return
        digests = self._digests(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            if digests[i] not in self._cached:
                self._cached[digests[i]] = block
                self._digest_of[block] = digests[i]
        seq.num_cached_blocks = full

    def forget_cached(self) -> None:
        """Unregister every block (after a device fault: a lost step may not have written the K/V
        it was credited with; or a tenant removed, whose name may come back for someone else).
        Held blocks stay with their holders; idle ones become empty. Sequences that arrived
        before keep their epoch: what they compute after is found by none that arrive after."""
        self.epoch += 1
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._digest_of.clear()

    def _digests(self, seq: Sequence, n: int) -> list[bytes]:
        """`seq`'s block digests, at least its first `n` blocks' (n <= its full blocks of known
        tokens): kept on the sequence, extended as it grows, never recomputed."""
        digests = seq.block_digests
        bs = self.block_size
        parent = digests[-1] if digests else namespace_digest(seq)
        for i in range(len(digests), n):
            h = hashlib.sha256(parent)
            h.update(array("q", seq.token_ids[i * bs:(i + 1) * bs]).tobytes())
            parent = h.digest()
            digests.append(parent)
        return digests
