"""Iteration-level continuous batching: which sequences run this step, and how many tokens each.

Plain Python over `Sequence` objects, no tensors, no I/O. Each step
  1. running sequences go first, in admission order: a decode takes 1 token, an unfinished
     prefill takes the next chunk that fits the token budget;
  2. when the KV cache cannot hold a running sequence's next tokens, a running sequence not
     yet scheduled this step is preempted (blocks freed, recomputed later) — never fail;
  3. waiting sequences are admitted while the token budget, `max_num_seqs`, the KV blocks and
     the step's adapter budget (distinct adapters, and the pool pages they take) allow; a long
     prompt is chunked; with prefix caching, a sequence whose next prompt blocks this step
     computes for another waits a step and takes them cached (`_shares_this_step`);
  4. adapters are prefetched for the next `prefetch_window` waiting sequences (residency.py).
Which sequence is admitted next and which is preempted is the policy's choice
(server/engine/policies: fcfs or vtc); the policy is also told every chunk scheduled.
The runner lays out the step's tokens and executes; the engine applies the results.

A sequence's adapters (`Sequence.adapters`) are its one adapter, or every expert of its mixture
or route: it can run when all of them are resident and all fit the step's adapter budget: at
most `max_loras` distinct adapters, taking at most `max_lora_pages` pool pages together (each
adapter `residency.pages_of` pages: rank-unit pages, server/adapters/slots.py). The engine refuses
a mixture larger than what an empty step always holds, so each one fits once the step is empty.

Adapter residency and fairness are one rule (docs/operator.md, "Fair scheduling"):
  a. overdue first: a waiting sequence passed over for `max_wait_steps` steps because of its
     adapter (not loaded, or the step's distinct-adapter budget spent) is served before any
     other, longest-waiting first. If its adapter is loaded but does not fit the adapter budget,
     nothing else is admitted until running sequences free a place (they finish: bounded);
     if it is still loading, its load is first in line and others are admitted meanwhile;
  b. otherwise the policy's order (VTC: lowest tenant counter) among sequences that can run
     now (adapter resident and within the budget). Skipping one that cannot run costs it
     nothing (VTC charges only computed tokens), so affinity never outranks fairness for
     longer than the load itself, and never longer than the bound of (a).
Bound: a waiting sequence whose adapter is resident is admitted within `max_wait_steps` + S
steps of becoming passed over, S the most steps a running sequence still needs (its remaining
prompt chunks + max_tokens), when KV blocks allow.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockAllocator
from server.engine.policies.base import SchedulingPolicy
from server.engine.residency import AdapterState, Residency
from server.engine.request import FinishReason, Sequence, SeqStatus


# A waiting sequence defers to a step computing at least this many of its prompt tokens for
# another (`Scheduler._shares_this_step`): past a few hundred tokens a prefill is compute-bound
# on a GPU, so sharing them saves more than the step of latency it costs.
SHARE_MIN_TOKENS = 256


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
class StepAdapters:
    """The distinct adapters of the step being scheduled, and the pool pages they take."""

    names: set[Hashable] = field(default_factory=set)
    pages: int = 0


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # The prefix cache, over the sequences admitted this step: tokens looked up, tokens found.
    prefix_queried: int = 0
    prefix_hits: int = 0

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
        max_lora_pages: int | None = None,
        adapter_ready: Callable[[Hashable], bool] | None = None,
        policy: SchedulingPolicy | None = None,
        residency: Residency | None = None,
        prefetch_window: int = 16,
        max_wait_steps: int = 32,
    ):
        """`max_loras` / `max_lora_pages`: the step's adapter budget, distinct adapters / pool pages
        (None: only the count; pages per adapter from `residency.pages_of`).
        `adapter_ready(name)` says whether an adapter can run now (loaded); a waiting
        sequence whose adapter is not ready stays queued without blocking others.
        `residency`: where adapters are, and prefetch (replaces `adapter_ready`).
        `policy`: admission and preemption order (default: first come, first served).
        `prefetch_window`: how many waiting sequences, in the policy's order, get their adapter
        loaded ahead of admission. `max_wait_steps`: the starvation bound's N (module docstring)."""
        self.policy = policy or SchedulingPolicy()
        self.residency = residency
        self.prefetch_window = prefetch_window
        self.max_wait_steps = max_wait_steps
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.max_lora_pages = max_lora_pages
        if max_lora_pages is not None and residency is None:
            raise ValueError("a page budget needs the residency that tells each adapter's pages")
        if residency is not None:
            self.adapter_ready = lambda ref: residency.state_of(ref) is AdapterState.RESIDENT
        else:
            self.adapter_ready = adapter_ready or (lambda _name: True)
        self._passed_over: dict[int, int] = {}  # id(waiting seq) -> steps its adapter kept it out
        self._window: list[Hashable] = []  # adapters of the last prefetch window, most wanted first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Sequences per adapter, running and waiting, kept at every change of status, so that the
        # gauges naming them cost O(distinct adapters) when they change, not O(sequences) a step.
        self._adapter_counts = {SeqStatus.RUNNING: Counter(), SeqStatus.WAITING: Counter()}
        self.adapters_version = 0  # bumped whenever an adapter joins or leaves either set
        # Keep a few blocks back when admitting, so running sequences can grow a block each
        # step without immediately preempting what was just admitted.
        self.watermark = max(1, allocator.num_blocks // 100)
        self._filling: set[bytes] | None = None  # per step: see schedule()

    # --- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.cache_epoch = self.allocator.epoch
        seq.status = SeqStatus.WAITING
        self._count(seq, SeqStatus.WAITING, 1)
        self.waiting.append(seq)
        self.policy.on_add(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence and free its KV blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            self._passed_over.pop(id(seq), None)
        if seq.status is not SeqStatus.FINISHED:
            self._count(seq, seq.status, -1)
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

    def adapters_of(self, status: SeqStatus) -> Iterable[Hashable]:
        """The distinct adapters of the running (or waiting) sequences."""
        return self._adapter_counts[status].keys()

    def _count(self, seq: Sequence, status: SeqStatus, sign: int) -> None:
        counts = self._adapter_counts[status]
        for a in seq.adapters:
            n = counts[a] + sign
            if n:
                counts[a] = n
            else:
                del counts[a]
            if n == (1 if sign > 0 else 0):
                self.adapters_version += 1

    def adapters_in_use(self) -> set[Hashable]:
        """Adapters that must stay resident: those of running sequences and of the prefetch window
        (about to run). Other waiting sequences' adapters may be evicted and loaded again when their
        turn nears: holding every queued adapter would let a long queue outgrow any memory budget."""
        return {a for s in self.running for a in s.adapters} | set(self._window)

    def is_overdue(self, seq: Sequence) -> bool:
        return self._passed_over.get(id(seq), 0) >= self.max_wait_steps

    # --- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        adapters = StepAdapters()
        # Digests of the prompt blocks this step fills, when someone waits who may share them.
        self._filling = set() if self.waiting and self.allocator.prefix_caching else None

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pages = self._adapter_room(seq, adapters) if not seq.all_sampled else None
            if pages is None:  # or it ends when its pending token arrives: nothing to compute
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(i, n, out):
                continue  # `seq` itself was preempted: running[i] is now the one behind it
            self._schedule_chunk(seq, n, out, adapters, pages)
            budget -= n
            i += 1

        if not out.preempted:
            self._admit(out, budget, adapters)
        self._prefetch()
        return out

    def _adapter_room(self, seq: Sequence, step: StepAdapters) -> int | None:
        """The pool pages `seq`'s adapters add to the step (a mixture or route needs every expert
        in the pool), or None if the step's adapters would then exceed `max_loras` or
        `max_lora_pages`."""
        new = [a for a in seq.adapters if a not in step.names]
        if not new:
            return 0
        if len(step.names) + len(new) > self.max_loras:
            return None
        if self.max_lora_pages is None:
            return 0
        pages = sum(map(self.residency.pages_of, new))
        return pages if step.pages + pages <= self.max_lora_pages else None

    def _ready(self, seq: Sequence) -> bool:
        return all(self.adapter_ready(a) for a in seq.adapters)

    def _schedule_chunk(self, seq: Sequence, n: int, out: SchedulerOutput, step: StepAdapters, pages: int) -> None:
        self.allocator.grow(seq, n)
        chunk = ScheduledChunk(seq, seq.num_computed_tokens, n)
        out.chunks.append(chunk)
        if self._filling is not None and chunk.start < seq.num_prompt_tokens:
            self._filling.update(self.allocator.digests_completed(seq, chunk.start, n))
        self.policy.on_scheduled(seq, chunk.start, n, chunk.samples)
        step.names.update(seq.adapters)
        step.pages += pages  # `_adapter_room`'s count for them

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
        self._count(seq, SeqStatus.RUNNING, -1)
        self._count(seq, SeqStatus.WAITING, 1)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int, adapters: StepAdapters) -> None:
        # A sequence that cannot run this step (adapter not loaded, or the adapter budget is
        # spent) is skipped, not waited for: the policy then picks among the rest, so one
        # tenant's adapter never holds back the others. Running out of KV blocks stops
        # admission instead: whoever is next in the policy's order is served first once
        # blocks free up, rather than smaller requests slipping past it. Overdue sequences
        # (rule a in the module docstring) go before the policy's choice.
        skip: set[int] = set()
        passed: list[Sequence] = []
        overdue = iter(self._overdue())
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next(overdue, None)
            if seq is not None and id(seq) in skip:
                continue
            from_policy = seq is None
            if from_policy:
                seq = self.policy.next_waiting(self.waiting, skip)
                if seq is None:
                    break
            if len(skip) > self.prefetch_window + self.max_num_seqs:
                break  # a long queue of cold adapters: bound the step's cost (they are not in the window)
            if not self._ready(seq):
                skip.add(id(seq))
                passed.append(seq)
                continue  # loading: first in the prefetch line; others run meanwhile
            pages = self._adapter_room(seq, adapters)
            if pages is None:
                skip.add(id(seq))
                passed.append(seq)
                if from_policy:
                    continue
                break  # overdue: hold admissions until running sequences free an adapter place
            prefix = self.allocator.cached_prefix(seq)
            if self._filling and self._shares_this_step(seq, prefix):
                skip.add(id(seq))  # not passed over: it runs next step, on those blocks
                continue
            n = min(seq.num_uncomputed_tokens - len(prefix) * self.allocator.block_size, budget)
            # The watermark is room for running sequences to grow: with none, a first chunk (or a
            # cached prefix) needing all of the cache would otherwise never be admitted.
            reserve = self.watermark if self.running else 0
            if not self.allocator.can_allocate(self.allocator.blocks_to_admit(seq, prefix, n), reserve):
                break
            if self.allocator.prefix_caching:
                self.allocator.take_prefix(seq, prefix)
                out.prefix_queried += seq.num_tokens
                out.prefix_hits += seq.num_computed_tokens
                if not seq.num_preemptions:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
            self.waiting.remove(seq)
            self._passed_over.pop(id(seq), None)
            self._count(seq, SeqStatus.WAITING, -1)
            self._count(seq, SeqStatus.RUNNING, 1)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._schedule_chunk(seq, n, out, adapters, pages)
            budget -= n
        for seq in passed:
            self._passed_over[id(seq)] = self._passed_over.get(id(seq), 0) + 1

    def _shares_this_step(self, seq: Sequence, prefix: list[int]) -> bool:
        """Whether `seq` should wait one step for prompt blocks this step computes for another
        sequence (`n` choices of one prompt, a burst on a new system prompt) rather than compute
        them again beside it: when they are at least half of what it has left to compute, or
        `SHARE_MIN_TOKENS`. Waiting, it finds them cached next step; admitted now, it would
        duplicate them (blocks are cached once their step has run: a step's sequences never
        read each other's K/V, so a failing one fails alone)."""
        shared = self.allocator.tokens_in_step(seq, prefix, self._filling)
        left = seq.num_uncomputed_tokens - len(prefix) * self.allocator.block_size
        return shared > 0 and (shared >= SHARE_MIN_TOKENS or 2 * shared >= left)

    def _overdue(self) -> list[Sequence]:
        """Waiting sequences past the bound, longest passed over first (queue order on ties)."""
        late = [s for s in self.waiting if self.is_overdue(s)] if self._passed_over else []
        return sorted(late, key=lambda s: -self._passed_over[id(s)])

    def _prefetch(self) -> None:
        """Name the adapters of the next `prefetch_window` waiting sequences to the residency:
        overdue ones first, then the policy's predicted order. At most `prefetch_window` adapters,
        except that a sequence's adapters are never split (a mixture runs only with all of them)."""
        if self.residency is None:
            return
        order = [*self._overdue(), *self.policy.prefetch_order(self.waiting, self.prefetch_window)]
        window: dict[Hashable, None] = {}  # ordered, distinct
        for s in order:
            if len(window) >= self.prefetch_window:
                break
            window.update(dict.fromkeys(s.adapters))
        self._window = list(window)
        if self._window:
            keep = {a for s in self.running for a in s.adapters} | set(self._window)
            self.residency.prefetch(self._window, keep)
