"""Executes one scheduled step: lays out the flat batch, runs the model, samples.

Tensor code only; it decides nothing. Everything per step is built once here and shared by
every layer: positions and the host layout of the batch (StepBatch), from which the attention
backend builds its metadata, and the adapter segments, from which the LoRA backend builds its
table (both backends chosen at engine start: server/engine/backends/). Decode steps that a
captured CUDA graph can run replay one instead (`graphs`: server/engine/cuda_graphs.py).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

import torch

from kernels import RowPlan
from kernels.upload import to_device
from server.adapters.manager import StepLora
from server.engine.backends import AttentionBackend, LoraBackend, LoraStep, StepBatch
from server.engine.request import Mixture, Sequence
from server.engine.sampler import SampledStep, Sampler
from server.engine.scheduler import ScheduledChunk
from server.engine.step_upload import StepUpload
from server.model.decoder import DecoderModel

if TYPE_CHECKING:
    from server.engine.cuda_graphs import DecodeGraphs


@dataclass
class StepResult:
    sampled: list[Sequence]  # sequences that get a new token from this step, in `tokens` order
    tokens: SampledStep | None  # None: no chunk sampled
    unsampled: list[Sequence] = field(default_factory=list)  # the step's other sequences (mid-prefill)

    @property
    def seqs(self) -> list[Sequence]:
        """Every sequence whose K/V this step writes."""
        return self.sampled + self.unsampled

    def rows(self) -> dict[Sequence, int]:
        """Each sampled sequence's row of `tokens.tokens`."""
        return {seq: row for row, seq in enumerate(self.sampled)}


@dataclass
class Pending:
    """The rows of a step whose input token is still on the device: row `rows[i]` reads token
    `srcs[i]` of the previous step's `tokens` [B_prev] (async scheduling); it is sampled row
    `sampled[i]` of this step (a pending token's decode samples)."""

    rows: list[int]
    sampled: list[int]
    srcs: list[int]
    tokens: torch.Tensor

    @staticmethod
    def of(rows: list[int], sampled: list[int], seqs: list[Sequence], prev: StepResult | None) -> Pending | None:
        """Rows `rows` (sampled rows `sampled`) of a step decode seqs[i]'s pending token, which
        `prev` sampled. O(B)."""
        if not rows:
            return None
        row_of = prev.rows()
        return Pending(rows, sampled, [row_of[seq] for seq in seqs], prev.tokens.tokens)

    def write(self, ids: torch.Tensor, rows: torch.Tensor, srcs: torch.Tensor) -> None:
        """ids[rows] = tokens[srcs], on the device (`rows`, `srcs`: these lists uploaded)."""
        ids[rows.long()] = self.tokens[srcs.long()].to(ids.dtype)

    def last_tokens(self, num_sampled: int) -> torch.Tensor:
        """[num_sampled] int64 on the device: each sampled row's pending token (its sequence's
        last, not on the host yet), -1 for the others: what penalties count besides the host's."""
        device = self.tokens.device
        at, src = to_device(torch.tensor(self.sampled + self.srcs, dtype=torch.int64), device).split(len(self.srcs))
        out = torch.full((num_sampled,), -1, dtype=torch.int64, device=device)
        out[at] = self.tokens[src]
        return out


class KVCache:
    """The paged KV cache tensors: [num_layers, num_blocks * block_size, 2, kv_heads, head_dim].
    With CUDA graphs the engine makes it one block larger than the allocator's: the last block is
    the scratch block graph padding rows write to."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(num_layers, num_blocks * block_size, 2, kv_heads, head_dim,
                                  dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * block_size * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: KVCache, sampler: Sampler, *,
                 attention: AttentionBackend, lora: LoraBackend | None = None,
                 graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv = kv_cache
        self.sampler = sampler
        self.attention = attention
        self.lora = lora
        self.graphs = graphs
        self.device = model.device
        self.upload = StepUpload(self.device)  # an eager step's inputs, in one copy
        # (graph size, with LoRA) -> steps that replayed that graph: what tests and debugging read
        self.graph_steps: Counter[tuple[int, bool]] = Counter()
        self.eager_steps = 0

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], step_lora: StepLora | None = None,
                prev: StepResult | None = None) -> StepResult:
        """Queue one step; its tokens come back through `StepResult.tokens`. `step_lora`: every
        chunk's adapters placed in device slots (see AdapterManager.activate); tokens are laid out
        single-adapter ones grouped by slot, then mixtures and routes, base-only tokens last.
        `prev`: the step before, if the host has not taken its tokens yet: a decode of a sequence
        whose last token is pending reads it from `prev` on the device."""
        if self.graphs is not None:
            result = self._replay(chunks, step_lora, prev)
            if result is not None:
                return result
        self.eager_steps += 1
        lora_step = None
        if step_lora is not None:
            chunks, lora_step = self._group_by_slot(chunks, step_lora)
        ids: list[int] = []
        positions: list[int] = []
        token_seq: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        unsampled: list[Sequence] = []
        pend_rows: list[int] = []
        pend_sampled: list[int] = []
        pend_seqs: list[Sequence] = []
        for row, chunk in enumerate(chunks):
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            if start < len(seq.token_ids):
                ids.extend(seq.token_ids[start:start + n])
            else:  # a decode of a pending token: `prev` has it on the device
                pend_rows.append(len(ids))
                pend_sampled.append(len(sampled))
                pend_seqs.append(seq)
                ids.append(0)
            positions.extend(range(start, start + n))
            token_seq.extend([row] * n)
            query_lens.append(n)
            context_lens.append(start + n)
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
            else:
                unsampled.append(seq)

        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables = list(chain.from_iterable(c.seq.block_table + [0] * (max_blocks - len(c.seq.block_table))
                                          for c in chunks))

        pending = Pending.of(pend_rows, pend_sampled, pend_seqs, prev)
        bs = self.kv.block_size
        ids_t, pos_t, seq_t, tables_t, rows_t, pend_t, src_t = self.upload(
            [ids, positions, token_seq, tables, sample_rows, pend_rows, pending.srcs if pending else []])
        if pending is not None:
            pending.write(ids_t, pend_t, src_t)
        tables_t = tables_t.view(len(chunks), max_blocks)
        pos_l = pos_t.long()
        # on the device: each token's cache slot, and the positions it attends to
        slots = tables_t[seq_t.long(), pos_l // bs].long() * bs + pos_l % bs
        attn = self.attention.prepare(StepBatch(
            query_lens=tuple(query_lens), context_lens=tuple(context_lens), block_tables=tables_t,
            token_seq=seq_t, token_ctx=pos_t + 1, slot_mapping=slots, block_size=bs))
        hidden = self.model.forward(ids_t.long(), pos_l, attn, self.kv.tensor, lora_step)
        if not sampled:
            return StepResult([], None, unsampled)
        logits = self.model.logits(hidden[rows_t.long()])
        return StepResult(sampled, self.sampler.sample(logits, sampled, pending), unsampled)

    def _replay(self, chunks: list[ScheduledChunk], step_lora: StepLora | None,
                prev: StepResult | None) -> StepResult | None:
        """Run the step as a captured decode graph if it is one a graph can run: every chunk a
        one-token decode that samples, at most the largest graph's rows, every LoRA row a single
        adapter that is not DoRA (mixtures, routes, DoRA, prefill and mixed steps run eagerly).
        None if it is not. LoRA rows first, grouped by slot; base-only rows last. Host work O(B)."""
        graphs = self.graphs
        if len(chunks) > graphs.max_size or not all(c.is_decode for c in chunks):
            return None
        lora = None
        if step_lora is not None:
            slot_of, is_dora, base = step_lora.slot_of, step_lora.slots.slot_dora, step_lora.num_slots
            keys = []
            for c in chunks:
                if c.seq.experts is not None:
                    return None
                slot = base if c.seq.adapter is None else slot_of[c.seq.adapter]
                if slot < base and is_dora[slot]:
                    return None
                keys.append(slot)
            order = sorted(range(len(chunks)), key=keys.__getitem__)
            chunks = [chunks[i] for i in order]
            seg_lens: list[int] = []
            seg_slots: list[int] = []
            for i in order:
                slot = keys[i]
                if slot == base:
                    break
                _extend_segments(seg_lens, seg_slots, slot, 1)
            if seg_slots:
                lora = (seg_lens, seg_slots, [step_lora.slot_rank[s] for s in seg_slots])
        seqs = [c.seq for c in chunks]
        ids: list[int] = []
        pend: list[int] = []  # rows decoding a pending token: `prev` has it on the device
        for r, c in enumerate(chunks):
            if c.start < len(c.seq.token_ids):
                ids.append(c.seq.token_ids[c.start])
            else:
                ids.append(0)
                pend.append(r)
        pending = Pending.of(pend, pend, [seqs[r] for r in pend], prev)
        logits, size = graphs.replay(ids, [c.start for c in chunks], [s.block_table for s in seqs], lora, pending)
        self.graph_steps[(size, lora is not None)] += 1
        return StepResult(seqs, self.sampler.sample(logits, seqs, pending))

    def _group_by_slot(self, chunks: list[ScheduledChunk], step_lora: StepLora
                       ) -> tuple[list[ScheduledChunk], LoraStep]:
        """Order chunks by adapter slot (single-adapter chunks, then mixtures and routes, base-only
        last); the LoRA backend builds the step's tables. Steps whose tokens each use one adapter
        get a table over tokens, as before mixtures existed; once a chunk mixes or routes adapters
        (`request.experts`) the tables come from a RowPlan (kernels/row_plan.py). DoRA tokens
        (single adapters only) are listed when there are any. Host work O(chunks + rows)."""
        slot_of = step_lora.slot_of
        base = step_lora.num_slots

        keys = [slot_of[c.seq.adapter] if c.seq.adapter is not None else base if c.seq.experts is not None
                else base + 1 for c in chunks]
        ordered = [chunks[i] for i in sorted(range(len(chunks)), key=keys.__getitem__)]
        is_dora = step_lora.slots.slot_dora
        plan = RowPlan() if base in keys else None
        seg_lens: list[int] = []
        seg_slots: list[int] = []
        dora_tokens, dora_slots = array("q"), array("q")
        at = 0
        for c in ordered:
            n = c.num_tokens
            if c.seq.adapter is not None:
                slot = slot_of[c.seq.adapter]
                if plan is not None:
                    plan.add(slot, at, n)
                else:
                    _extend_segments(seg_lens, seg_slots, slot, n)
                if is_dora[slot]:
                    dora_tokens.extend(range(at, at + n))
                    dora_slots.extend([slot] * n)
            else:
                experts = c.seq.experts
                if experts is None:
                    break  # base-only chunks come last
                slots = [slot_of[ref] for ref in experts.adapters]
                if isinstance(experts, Mixture):
                    plan.add_mixture(slots, experts.weights, at, n)
                else:  # Route
                    plan.add_routed(slots, at, n, experts.top_k, experts.temperature)
            at += n
        dora = self.lora.dora(dora_tokens, dora_slots) if dora_tokens else None
        if plan is not None:
            return ordered, self.lora.planned(step_lora.slots, plan, step_lora.slot_rank, base, dora)
        table = self.lora.segments(seg_lens, seg_slots, [step_lora.slot_rank[s] for s in seg_slots], base)
        return ordered, self.lora.applier(step_lora.slots, table, dora)


def _extend_segments(seg_lens: list[int], seg_slots: list[int], slot: int, n: int) -> None:
    """Append `n` tokens of `slot` to a segment table built in slot order (one segment per run)."""
    if seg_slots and seg_slots[-1] == slot:
        seg_lens[-1] += n
    else:
        seg_slots.append(slot)
        seg_lens.append(n)
