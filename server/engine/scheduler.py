"""Iteration-level continuous batching: which sequences run this step, and how many tokens each.

Plain Python over `Sequence` objects, no tensors, no I/O. Each step
  1. running sequences go first, in admission order: a decode takes 1 token, an unfinished
     prefill takes the next chunk that fits the token budget;
  2. when the KV cache cannot hold a running sequence's next tokens, a running sequence not
     yet scheduled this step is preempted (blocks freed, recomputed later) — never fail;
  3. waiting sequences are admitted while the token budget, `max_num_seqs`, the KV blocks and
     the distinct-adapter budget allow; a long prompt is chunked.
Which sequence is admitted next and which is preempted is the policy's choice
(server/engine/policies: fcfs or vtc); the policy is also told every chunk scheduled.
The runner lays out the step's tokens and executes; the engine applies the results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockAllocator
from server.engine.policies.base import SchedulingPolicy
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
        adapter_ready: Callable[[Hashable], bool] | None = None,
        policy: SchedulingPolicy | None = None,
    ):
        """`adapter_ready(name)` says whether an adapter can run now (loaded); a waiting
        sequence whose adapter is not ready stays queued without blocking others.
        `policy`: admission and preemption order (default: first come, first served)."""
        self.policy = policy or SchedulingPolicy()
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
        self.policy.on_add(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence and free its KV blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SeqStatus.FINISHED:
            self.policy.on_finish(seq)
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

    def adapters_in_use(self) -> set[Hashable]:
        """Adapters referenced by a queued or running sequence (must not be evicted)."""
        return {s.adapter for s in (*self.running, *self.waiting) if s.adapter is not None}

    # --- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        adapters: set[Hashable] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not self._adapter_fits(seq, adapters):
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(i, n, out):
                continue  # `seq` itself was preempted: running[i] is now the one behind it
            self._schedule_chunk(seq, n, out, adapters)
            budget -= n
            i += 1

        if not out.preempted:
            self._admit(out, budget, adapters)
        return out

    def _adapter_fits(self, seq: Sequence, adapters: set[Hashable]) -> bool:
        return seq.adapter is None or seq.adapter in adapters or len(adapters) < self.max_loras

    def _schedule_chunk(self, seq: Sequence, n: int, out: SchedulerOutput, adapters: set[Hashable]) -> None:
        self.allocator.grow(seq, n)
        chunk = ScheduledChunk(seq, seq.num_computed_tokens, n)
        out.chunks.append(chunk)
        self.policy.on_scheduled(seq, chunk.start, n, chunk.samples)
        if seq.adapter is not None:
            adapters.add(seq.adapter)

    def _make_room(self, i: int, n: int, out: SchedulerOutput) -> bool:
        """Preempt running sequences until `running[i]` fits `n` more tokens.

        Victims (the policy's choice) come from `running[i:]`, so nothing already scheduled
        this step is touched. False if `running[i]` had to go itself.
        """
        seq = self.running[i]
        while not self.allocator.can_allocate(self.allocator.blocks_needed(seq, n)):
            victim = self.policy.preemption_victim(self.running[i:])
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

    def _admit(self, out: SchedulerOutput, budget: int, adapters: set[Hashable]) -> None:
        # A sequence that cannot run this step (adapter not loaded, or the adapter budget is
        # spent) is skipped, not waited for: the policy then picks among the rest, so one
        # tenant's adapter never holds back the others. Running out of KV blocks stops
        # admission instead: whoever is next in the policy's order is served first once
        # blocks free up, rather than smaller requests slipping past it.
        skip: set[int] = set()
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.policy.next_waiting(self.waiting, skip)
            if seq is None:
                break
            if seq.adapter is not None and (
                not self.adapter_ready(seq.adapter) or not self._adapter_fits(seq, adapters)
            ):
                skip.add(id(seq))
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.allocator.can_allocate(self.allocator.blocks_needed(seq, n), self.watermark):
                break
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._schedule_chunk(seq, n, out, adapters)
            budget -= n
