"""How many paged KV-cache blocks the engine allocates, and the max_model_len they allow.

`--kv-cache-memory` given: that many bytes, on every device. Not given: 2 GiB off CUDA; on CUDA
the memory plan, as vLLM's `--gpu-memory-utilization`: once the weights and the adapter pool are
on the device, a profile forward of `--max-num-batched-tokens` tokens measures the activation
peak, and the cache gets what is left of `utilization` x the device's memory after this engine's
memory in use, that peak and a reserve for the decode CUDA graphs (captured after the cache). The
arithmetic is `plan_blocks` (pure, tested on CPU); `measure` reads the device around the profile.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass

import torch

from server.config import CacheConfig, Config, GiB
from server.engine.backends import AttentionBackend, StepBatch
from server.engine.backends.attention import GraphTensors
from server.engine.sampler import _top_p
from server.model.decoder import DecoderModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    """What the plan reads; every field but `utilization` in bytes."""

    total: int  # the device's memory
    free: int  # free on the device now (after the profile, torch's cache emptied)
    used: int  # held by this engine now: weights, adapter pool, workspaces (from before its start to now)
    activation_peak: int  # the profile forwards' transient peak: what eager steps allocate and free
    graph_reserve: int  # what the decode CUDA graphs will hold (0 without graphs)
    block_bytes: int  # one KV block, every layer, K and V
    utilization: float  # the fraction of `total` this engine may hold, in (0, 1]


@dataclass(frozen=True)
class KVPlan:
    num_blocks: int
    budget: int  # bytes: utilization x total - used - activation peak - graph reserve
    room: int  # bytes: free - activation peak - graph reserve (other processes' memory is not ours)

    @property
    def limited_by_free(self) -> bool:
        return self.room < self.budget


def plan_blocks(m: DeviceMemory) -> KVPlan:
    """The KV blocks that fit in both this engine's share and what is free. Raises ValueError,
    naming the flags, when not one block fits."""
    if not 0 < m.utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {m.utilization}")
    needed = m.activation_peak + m.graph_reserve
    budget = int(m.total * m.utilization) - m.used - needed
    room = m.free - needed
    num_blocks = max(0, min(budget, room) // m.block_bytes)
    if num_blocks < 1:
        raise ValueError(
            f"no device memory left for the KV cache: --gpu-memory-utilization {m.utilization} of "
            f"{m.total / GiB:.1f} GiB, {m.free / GiB:.1f} GiB free; this engine holds {m.used / GiB:.2f} GiB "
            f"(weights, adapter pool --lora-pool-memory), a step's activations take {m.activation_peak / GiB:.2f} "
            f"GiB (--max-num-batched-tokens), CUDA graphs {m.graph_reserve / GiB:.2f} GiB (--enforce-eager: "
            f"none); one block takes {m.block_bytes} bytes. Raise --gpu-memory-utilization, lower those, or "
            "give --kv-cache-memory")
    return KVPlan(num_blocks, budget, room)


def fixed_blocks(config: Config, device: torch.device, block_bytes: int, max_len: int) -> tuple[int | None, int]:
    """Before any loading: the blocks --kv-cache-memory holds, or 2 GiB off CUDA. -> (KV blocks,
    max_model_len, see `cap_model_len`); (None, max_len) on CUDA without the flag: `planned_blocks`."""
    size = config.cache.kv_cache_memory
    if size is None and device.type == "cuda":
        return None, max_len
    size = CacheConfig.HOST_KV_CACHE_MEMORY if size is None else size
    return cap_model_len(config, size // block_bytes, max_len, f"--kv-cache-memory {size} bytes")


def planned_blocks(config: Config, model: DecoderModel, attention: AttentionBackend, block_bytes: int,
                   max_len: int, graph_ladder: tuple[int, ...] | None, start_free: int) -> tuple[int, int]:
    """On CUDA, after the weights and the adapter pool are on the device and before the KV cache:
    the memory plan's blocks. `graph_ladder`: the decode graph sizes (None: no graphs); `start_free`:
    `free_bytes` at the engine's start. -> (KV blocks, max_model_len, see `cap_model_len`)."""
    m = measure(model, attention, config, block_bytes, max_len, graph_ladder, start_free)
    plan = plan_blocks(m)
    flag = f"--gpu-memory-utilization {m.utilization}"
    log.info("KV cache: %.2f GiB (%s%s): device %.1f GiB, this engine %.2f GiB, activations %.2f GiB, "
             "CUDA graphs %.2f GiB", plan.num_blocks * block_bytes / GiB, flag,
             "; limited by the free memory" if plan.limited_by_free else "", m.total / GiB, m.used / GiB,
             m.activation_peak / GiB, m.graph_reserve / GiB)
    # KV slots are int32 indexes (with graphs, one scratch block more): a small model on a large GPU
    num_blocks = min(plan.num_blocks, (2 ** 31 - 1) // config.cache.block_size - 1)
    return cap_model_len(config, num_blocks, max_len, flag)


def cap_model_len(config: Config, num_blocks: int, max_len: int, flag: str) -> tuple[int, int]:
    """-> (num_blocks; max_len, lowered with a warning to what the blocks hold). Under 16 tokens is
    an error naming `flag`, the setting that sized them."""
    capped = num_blocks * config.cache.block_size
    if capped < max_len:
        if capped < 16:
            raise ValueError(f"{flag} holds {capped} tokens of KV cache: too small")
        log.warning("KV cache holds %d tokens: capping max_model_len from %d", capped, max_len)
        max_len = capped
    return num_blocks, max_len


def free_bytes(device: torch.device) -> int | None:
    """Free device memory now (bytes), None off CUDA: the engine reads it at its start, before it
    loads anything, so the plan counts only what this engine holds, not other processes' memory
    (nor the CUDA context, which this first call creates: the 1 - utilization headroom holds it)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def measure(model: DecoderModel, attention: AttentionBackend, config: Config, block_bytes: int, max_len: int,
            graph_ladder: tuple[int, ...] | None, start_free: int) -> DeviceMemory:
    """Run the profile forwards on the CUDA device and read its memory (see DeviceMemory)."""
    device = model.device
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    graph_reserve = 0
    if graph_ladder:
        # The graph pool: the largest graph's forward (smaller ones, captured after it, reuse its
        # memory; the LoRA deltas are not profiled, see profile_prefill) and every graph's output,
        # with and without LoRA. Its peak also counts as a step's: capture warms up eagerly.
        profile_decode(model, attention, graph_ladder[-1], max_len, config.cache.block_size)
        torch.cuda.synchronize(device)
        row_bytes = model.arch.hidden_size * model.dtype.itemsize
        graph_reserve = torch.cuda.max_memory_allocated(device) - base + 2 * sum(graph_ladder) * row_bytes
    sc = config.scheduler
    profile_prefill(model, attention, sc.max_num_batched_tokens, sc.max_num_seqs, max_len, config.cache.block_size)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total=total, free=free, used=start_free - free, activation_peak=peak,
                        graph_reserve=graph_reserve, block_bytes=block_bytes,
                        utilization=config.cache.gpu_memory_utilization)


@torch.inference_mode()
def profile_prefill(model: DecoderModel, attention: AttentionBackend, num_tokens: int, max_seqs: int, max_len: int,
                    block_size: int) -> torch.Tensor:
    """One eager step of `num_tokens` prompt tokens (rows of up to `max_len`), K/V written to a
    scratch cache of their own blocks (counted in the peak), then the logits of as many sampled
    rows as a step may have (`max_seqs`, at most one per token) and the sampler's largest working
    set, top-p's sort. (Without LoRA: the adapters' deltas are [tokens, rank], small beside the
    MLP's [tokens, intermediate].) -> the top-p masked logits [rows, vocab]."""
    lens = [min(max_len, num_tokens - at) for at in range(0, num_tokens, max_len)]
    per_row = math.ceil(max(lens) / block_size)
    dev = model.device
    rows = torch.arange(len(lens), device=dev, dtype=torch.int32).repeat_interleave(torch.tensor(lens, device=dev))
    pos = torch.cat([torch.arange(n, device=dev, dtype=torch.int32) for n in lens])
    tables = torch.arange(len(lens) * per_row, device=dev, dtype=torch.int32).view(len(lens), per_row)
    slots = tables[rows.long(), pos.long() // block_size].long() * block_size + pos.long() % block_size
    cache = _scratch_cache(model, len(lens) * per_row * block_size)
    attn = attention.prepare(StepBatch(query_lens=tuple(lens), context_lens=tuple(lens), block_tables=tables,
                                       token_seq=rows, token_ctx=pos + 1, slot_mapping=slots, block_size=block_size))
    ids = torch.arange(num_tokens, device=dev) % model.arch.vocab_size  # rows differ: tests see their K/V apart
    hidden = model.forward(ids, pos.long(), attn, cache)
    sampled = min(max_seqs, num_tokens)
    return _top_p(model.logits(hidden[-sampled:]), [0.9] * sampled)


@torch.inference_mode()
def profile_decode(model: DecoderModel, attention: AttentionBackend, size: int, max_len: int,
                   block_size: int) -> torch.Tensor:
    """The forward a decode graph of `size` rows captures (the attention's graph step, launch sizes
    for `max_len`), every row at position 0 of a scratch cache. -> final hidden states [size, hidden]."""
    dev = model.device
    width = math.ceil(max_len / block_size)
    rows = torch.arange(size, device=dev, dtype=torch.int32)
    cache = _scratch_cache(model, size)
    tensors = GraphTensors(slot_mapping=rows.long(), block_tables=torch.zeros(size, width, dtype=torch.int32,
                                                                              device=dev),
                           token_seq=rows, token_ctx=torch.ones(size, dtype=torch.int32, device=dev),
                           block_size=block_size)
    zeros = torch.zeros(size, dtype=torch.int64, device=dev)
    return model.forward(zeros, zeros, attention.graph_step(tensors, max_len), cache)


def _scratch_cache(model: DecoderModel, slots: int) -> torch.Tensor:
    """[num_layers, slots, 2, kv_heads, head_dim]: a profile's own KV cache."""
    a = model.arch
    return torch.zeros(a.num_layers, slots, 2, a.num_kv_heads, a.head_dim, dtype=model.dtype, device=model.device)
