"""Iteration-level continuous batching: which sequences run this step, and how many tokens each.

Policy only: plain Python over `Sequence` objects, no tensors. Each step
  1. running sequences go first, in arrival order: a decode takes 1 token, an unfinished
     prefill takes the next chunk that fits the token budget;
  2. when the KV cache cannot hold a running sequence's next tokens, the most recently
     admitted running sequence is preempted (blocks freed, recomputed later) — never fail;
  3. waiting sequences are admitted in order while the token budget, `max_num_seqs`, the
     KV blocks and the distinct-adapter budget allow; a long prompt is chunked.
The runner lays out the step's tokens and executes; the engine applies the results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockAllocator
from server.engine.request import FinishReason, Sequence, SeqStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at position `start`, computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so the step samples its next one."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.samples


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int = 0,
        adapter_ready: Callable[[str], bool] | None = None,
    ):
        """`adapter_ready(name)` says whether an adapter can run now (loaded); a waiting
        sequence whose adapter is not ready stays queued without blocking others."""
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.adapter_ready = adapter_ready or (lambda _name: True)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Keep a few blocks back when admitting, so running sequences can grow a block each
        # step without immediately preempting what was just admitted.
        self.watermark = max(1, allocator.num_blocks // 100)

    # --- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence and free its KV blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        """Adapters referenced by a queued or running sequence (must not be evicted)."""
        return {s.adapter for s in (*self.running, *self.waiting) if s.adapter is not None}

    # --- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        adapters: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not self._adapter_fits(seq, adapters):
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, n, out):
                break  # `seq` itself was preempted: it was the last running sequence
            self.allocator.grow(seq, n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            budget -= n
            i += 1

        if not out.preempted:
            self._admit(out, budget, adapters)
        return out

    def _adapter_fits(self, seq: Sequence, adapters: set[str]) -> bool:
        return seq.adapter is None or seq.adapter in adapters or len(adapters) < self.max_loras

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt the most recently admitted running sequences until `seq` fits.

        Victims come from the end of `running`, behind `seq`, so nothing already scheduled
        this step is touched. False if `seq` had to go itself.
        """
        while not self.allocator.can_allocate(self.allocator.blocks_needed(seq, n)):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.allocator.free(seq)
        seq.num_computed_tokens = 0  # recompute: prompt + output so far become its prefill
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int, adapters: set[str]) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.adapter is not None and (
                not self.adapter_ready(seq.adapter) or not self._adapter_fits(seq, adapters)
            ):
                skipped.append(self.waiting.popleft())  # others may still run this step
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.allocator.can_allocate(self.allocator.blocks_needed(seq, n), self.watermark):
                break
            self.waiting.popleft()
            self.allocator.grow(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
