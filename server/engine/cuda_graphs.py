"""CUDA graphs for decode steps: captured once at engine start, replayed for a step's whole forward.

A decode step launches every kernel of every layer; on a GPU the host would spend longer issuing
them than the GPU spends running them. So, at start, the forward of a decode batch (embedding to
the final norm) is captured as a CUDA graph for each size of a ladder (1, 2, 4, 8, then multiples of 8 up
to --max-num-seqs), twice: with LoRA and without (a step of base-only rows replays the one without,
so enabling LoRA costs base-only traffic nothing). A step of B rows replays the smallest size >= B.
The graphs end at the final hidden states; the logits of the B real rows are computed after the
replay (one GEMM): a graph's output stays allocated in the shared graph pool for the engine's life,
and [size, vocab] float32 logits per graph would hold ~4 GB at an 8B model's 128k vocabulary over
a ladder to 256 (with and without LoRA), hidden states 1/30 of that; padding rows get no logits.

Everything the graph reads per step sits in static device buffers, written by ONE host-to-device
copy from one pinned int32 buffer per step (`_Layout`): token ids, positions, KV slots, contexts,
block tables and the LoRA segment table (kernels/segments.py `fill_static`). Rows B..size-1 are
padding: their K/V go to a scratch KV block no sequence owns (the engine allocates one block past
the allocator's), they attend to one position of block 0, and their hidden states are dropped. The
kernels' launch sizes are fixed at capture (backends' `graph_step` / `static_step`), so nothing inside
a replay waits for the host; sampling stays outside the graph (the step's one synchronisation).

Who replays is the runner's decision (server/engine/model_runner.py): all chunks single-token
decodes that sample, at most the largest size, and every LoRA row a single non-DoRA adapter.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.segments import fill_static, static_len
from kernels.upload import to_device
from server.adapters.slots import LoraSlots
from server.engine.backends import AttentionBackend, LoraBackend
from server.engine.backends.attention import GraphTensors
from server.model.decoder import DecoderModel

if TYPE_CHECKING:
    from server.engine.model_runner import Pending

log = logging.getLogger(__name__)

# (seg_lens, seg_slots, seg_ranks) of a step's LoRA rows, which come first in the batch
LoraLayout = tuple[Sequence[int], Sequence[int], Sequence[int]]


def batch_ladder(max_num_seqs: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Captured batch sizes, ascending: `sizes` (--cuda-graph-sizes), else 1, 2, 4, 8, then multiples
    of 8, capped at (and including) max_num_seqs. Fewer sizes capture faster and pad more."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if sizes is not None:
        if not sizes or min(sizes) < 1 or max(sizes) > max_num_seqs:
            raise ValueError(f"--cuda-graph-sizes {','.join(map(str, sizes))}: each size must be between 1 "
                             f"and --max-num-seqs ({max_num_seqs})")
        return tuple(sorted(set(sizes)))
    ladder = {s for s in (1, 2, 4, 8) if s < max_num_seqs} | set(range(16, max_num_seqs, 8)) | {max_num_seqs}
    return tuple(sorted(ladder))


def graph_size(ladder: Sequence[int], batch: int) -> int | None:
    """The smallest size of `ladder` (ascending) that holds `batch` rows, or None if none does."""
    i = bisect.bisect_left(ladder, batch)
    return ladder[i] if i < len(ladder) else None


def unavailable(device: torch.device, attention: AttentionBackend, lora: LoraBackend | None,
                enforce_eager: bool) -> str | None:
    """Why decode steps cannot run as CUDA graphs here, or None if they can (asked once, at start)."""
    if enforce_eager:
        return "--enforce-eager"
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if attention.name != "triton":
        return f"the {attention.name} attention backend is not graph-safe (triton is)"
    if lora is not None and lora.name != "triton":
        return f"the {lora.name} LoRA backend is not graph-safe (triton is)"
    return None


@dataclass(frozen=True)
class _Layout:
    """Where a size's inputs sit in the int32 buffers (host and device alike), from offset 0:
    ids, positions, KV slots [size] each (contiguous: cast to int64 by one copy in the graph),
    contexts [size], the static LoRA table [static_len(size)], block tables [size, width]."""

    size: int
    width: int  # block-table columns: max_model_len / block_size, rounded up

    @property
    def ctx(self) -> int:
        return 3 * self.size

    @property
    def lora(self) -> int:
        return 4 * self.size

    @property
    def tables(self) -> int:
        return self.lora + static_len(self.size)

    @property
    def length(self) -> int:
        return self.tables + self.size * self.width


@dataclass
class _Graph:
    run: Callable[[], torch.Tensor]  # replays the step; -> final hidden states [size, hidden]


class DecodeGraphs:
    """The decode graphs of one engine, their static buffers, and the per-step copy into them.

    capture=False records the step function instead of a CUDA graph and replays it by calling it
    over the same static buffers. That mode exists ONLY so that CPU tests (Triton interpreter, tiny
    model) exercise everything but the capture itself: padding, the one-copy static inputs, the
    static LoRA table, fixed launch sizes. (It also skips the warm-up runs, which only serve capture.)
    """

    def __init__(self, model: DecoderModel, kv_cache, attention: AttentionBackend, lora: LoraBackend | None,
                 lora_slots: LoraSlots | None, *, ladder: Sequence[int], max_model_len: int, scratch_block: int,
                 capture: bool):
        """kv_cache: the runner's KVCache, holding `scratch_block` beyond the allocator's blocks;
        ladder: the batch sizes to capture, ascending (batch_ladder)."""
        self.model = model
        self.kv = kv_cache
        self.attention = attention
        self.lora = lora if lora_slots is not None else None
        self.slots = lora_slots
        self.ladder = tuple(ladder)
        self.max_size = self.ladder[-1]
        self.block_size = kv_cache.block_size
        self.width = -(-max_model_len // self.block_size)
        self.max_model_len = max_model_len
        self.scratch_slot = scratch_block * self.block_size
        if (scratch_block + 1) * self.block_size > 2 ** 31 - 1:
            raise ValueError("the KV cache has more slots than int32 indexes")
        dev = model.device
        n = _Layout(self.max_size, self.width).length
        self._host_tensor = torch.zeros(n, dtype=torch.int32, pin_memory=dev.type == "cuda")
        # a ctypes view of the same memory: list slices are written at C speed, no tensor per step
        self._host = (ctypes.c_int32 * n).from_address(self._host_tensor.data_ptr())
        self._dev = torch.zeros(n, dtype=torch.int32, device=dev)
        self._copied = torch.cuda.Event() if capture else None  # the last copy out of `_host_tensor`
        self._rows = torch.arange(self.max_size, dtype=torch.int32, device=dev)
        self._i64 = torch.zeros(3, self.max_size, dtype=torch.int64, device=dev)  # ids, positions, slots
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # Warm-ups and captures on one side stream: what a first launch creates per stream (cuBLAS
        # workspaces) is made by the warm-up, never inside a capture; replays run on any stream.
        self._stream = torch.cuda.Stream(dev) if capture else None
        self.graphs: dict[tuple[int, bool], _Graph] = {}
        self.attention_steps = []  # each graph's attention step (its launch config: tests)
        with torch.inference_mode():
            if capture:  # the weights and the KV cache were written on the current stream
                self._stream.wait_stream(torch.cuda.current_stream(dev))
            for size in reversed(self.ladder):  # largest first: smaller ones reuse its pool memory
                for with_lora in ((True, False) if self.lora is not None else (False,)):
                    self.graphs[(size, with_lora)] = self._record(size, with_lora)
        if capture:
            torch.cuda.synchronize()

    # --- start -----------------------------------------------------------------------------------
    def _record(self, size: int, with_lora: bool) -> _Graph:
        lay = _Layout(size, self.width)
        dev = self._dev
        tensors = GraphTensors(slot_mapping=self._i64[2, :size],
                               block_tables=dev[lay.tables: lay.length].view(size, self.width),
                               token_seq=self._rows[:size], token_ctx=dev[lay.ctx: lay.ctx + size],
                               block_size=self.block_size)
        attn = self.attention.graph_step(tensors, self.max_model_len)
        self.attention_steps.append(attn)
        lora = self.lora.static_step(self.slots, dev[lay.lora: lay.tables], size) if with_lora else None
        ints, longs = dev[:3 * size].view(3, size), self._i64[:, :size]
        model, cache = self.model, self.kv.tensor

        def step() -> torch.Tensor:
            longs.copy_(ints)  # ids, positions, slots to int64, inside the graph
            return model.forward(longs[0], longs[1], attn, cache, lora)

        if not self.capture:
            return _Graph(step)
        self._fill_padding(lay, with_lora)
        with torch.cuda.stream(self._stream):
            self._dev[:lay.length].copy_(self._host_tensor[:lay.length])
            step()  # warm-up: compiles the kernels, creates library handles, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a loader thread's legal copy (another stream) during the capture must not
        # invalidate it, as "global" mode would
        with torch.cuda.graph(graph, pool=self.pool, stream=self._stream, capture_error_mode="thread_local"):
            hidden = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden
        return _Graph(replay)

    def _fill_padding(self, lay: _Layout, with_lora: bool) -> None:
        """The warm-up's inputs: every row padding (its K/V go to the scratch block) and, with
        LoRA, an empty table (no segment, no row), never what a larger size's fill left there:
        its slots and rows would be out of range for this size."""
        self._fill(lay, [], [], [], ([], [], []) if with_lora else None)

    # --- each step -------------------------------------------------------------------------------
    def size_for(self, batch: int) -> int | None:
        return graph_size(self.ladder, batch)

    def replay(self, ids: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]],
               lora: LoraLayout | None, pending: Pending | None = None) -> tuple[torch.Tensor, int]:
        """One decode step of B <= max_size rows: row r decodes token ids[r] at positions[r] of the
        sequence whose block table is tables[r]. `lora`: the segments of the LoRA rows (the first
        ones), or None for a step of base-only rows. `pending`: rows whose token the previous step
        sampled, written over ids[r] on the device. -> (logits [B, vocab] float32, graph size).
        Host work O(B + blocks)."""
        size = self.size_for(len(ids))
        if size is None:
            raise ValueError(f"{len(ids)} rows exceed the largest graph ({self.max_size})")
        lay = _Layout(size, self.width)
        self._fill(lay, ids, positions, tables, lora)
        self._dev[:lay.length].copy_(self._host_tensor[:lay.length], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if pending is not None:  # the ids are the buffer's first `size` entries
            rows, srcs = to_device(torch.tensor(pending.rows + pending.srcs, dtype=torch.int32),
                                   self._dev.device).split(len(pending.rows))
            pending.write(self._dev, rows, srcs)
        hidden = self.graphs[(size, lora is not None)].run()
        return self.model.logits(hidden[:len(ids)]), size

    def _fill(self, lay: _Layout, ids, positions, tables, lora: LoraLayout | None) -> None:
        """Write one step's inputs into the pinned buffer, once the previous step's copy out of
        it is done. It normally is (that copy comes first in its step, and the step before it was
        read back: at once, or with async scheduling before this one is launched), but a step whose
        sampling failed before reading anything back is retried at once."""
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()
        h, bs, w, size = self._host, self.block_size, self.width, lay.size
        pad = size - len(ids)
        slots = [t[p // bs] * bs + p % bs for p, t in zip(positions, tables)]
        h[0: lay.lora] = (list(ids) + [0] * pad + list(positions) + [0] * pad + slots + [self.scratch_slot] * pad
                          + [p + 1 for p in positions] + [1] * pad)
        if lora is not None:
            fill_static(h, lay.lora, size, *lora)
        # only a row's first ceil(ctx / block_size) entries are ever read: the rest may be stale
        at = lay.tables
        for t in tables:
            h[at: at + len(t)] = t
            at += w
        for r in range(len(ids), size):
            h[lay.tables + r * w] = 0  # padding rows attend to position 0 of block 0


def build(off: str | None, model: DecoderModel, kv_cache, attention: AttentionBackend, lora: LoraBackend | None,
          lora_slots: LoraSlots | None, **kwargs) -> DecodeGraphs | None:
    """The engine's DecodeGraphs (`kwargs`: theirs), or None when `off`, `unavailable`'s answer,
    says why they cannot run; logged either way."""
    if off is not None:
        log.info("CUDA graphs off: %s", off)
        return None
    t0 = time.perf_counter()
    graphs = DecodeGraphs(model, kv_cache, attention, lora, lora_slots, **kwargs)
    log.info("CUDA graphs: decode batch sizes %s, %s, captured in %.1fs", list(graphs.ladder),
             "with and without LoRA" if graphs.lora else "no LoRA", time.perf_counter() - t0)
    return graphs
