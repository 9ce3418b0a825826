"""Attention backends: picked once at engine start; each builds its own per-step metadata.

  cpp     CPU: the C++ paged attention (kernels/paged_attention.py). It has neither sliding
          windows nor soft-capping: a layer that needs one in a step (a window shorter than the
          step's longest context, or any cap) runs the torch path for that step.
  torch   any device: gather + SDPA (kernels/paged_attention.py). On CUDA it synchronises with
          the host inside each layer: a fallback and a debugging aid, not a GPU path.
  triton  CUDA: kernels/triton_paged_attention.py, windows and soft-capping included, launch
          sizes and query tiles from the runner's host lists (no host synchronisation).
          On CPU only under Triton's interpreter (tests). Graph-safe: `graph_step` gives the
          fixed-launch decode step a CUDA graph captures (server/engine/cuda_graphs.py).

Every step object writes the step's new K/V into the layer's cache, then attends.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kernels.paged_attention import cpp_error, load_cpp_extension, paged_attention
from server.model.arch import ModelArch

from .availability import triton_unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepBatch:
    """One step's flat batch as the runner laid it out: lengths on the host, tensors on the
    step's device (uploaded in one copy: server/engine/step_upload.py). Rows are the step's
    sequences in batch order; each row's tokens are contiguous, in position order."""

    query_lens: tuple[int, ...]  # [B] tokens of each row in this step
    context_lens: tuple[int, ...]  # [B] cache positions each row's last token attends to (start + n)
    block_tables: torch.Tensor  # [B, max_blocks] int32, zero-padded
    token_seq: torch.Tensor  # [T] int32: row of each token
    token_ctx: torch.Tensor  # [T] int32: positions [0, ctx) each token attends to
    slot_mapping: torch.Tensor  # [T] int64: cache slot each token's new K/V goes to
    block_size: int

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)


class AttentionBackend(ABC):
    name: ClassVar[str]

    def __init__(self, arch: ModelArch, device: torch.device, dtype: torch.dtype):
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.scale = arch.attn_scale
        self.softcap = arch.attn_softcap
        self.windows = arch.layer_windows

    @classmethod
    @abstractmethod
    def unavailable(cls, arch: ModelArch, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot serve this model here, or None. Called before construction."""

    @abstractmethod
    def prepare(self, batch: StepBatch) -> "PagedStep | TritonStep":
        """The step's metadata on the device (one per step, shared by every layer)."""


class _StepTensors:
    """What every kernel reads: the step's KV slots, block tables, token rows and contexts
    (moved to the device if a caller built them elsewhere; the runner's already are)."""

    def __init__(self, batch: StepBatch, device: torch.device):
        self.slot_mapping = batch.slot_mapping.to(device)
        self.block_tables = batch.block_tables.to(device)
        self.token_seq = batch.token_seq.to(device)
        self.token_ctx = batch.token_ctx.to(device)
        self.block_size = batch.block_size


class PagedStep(_StepTensors):
    """Per-step metadata of the cpp/torch kernels: the common tensors, and which kernel (and
    window) each layer uses this step."""

    def __init__(self, batch: StepBatch, device: torch.device, scale: float, softcap: float | None,
                 plan: list[tuple[str, int | None]]):
        super().__init__(batch, device)
        self.scale = scale
        self.softcap = softcap
        self.plan = plan

    def forward(self, layer: int, q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> None:
        """q [T, H, D], kv [T, 2, KVH, D] (this step's keys/values), cache [S, 2, KVH, D], out [T, H, D]."""
        cache.index_copy_(0, self.slot_mapping, kv)
        kernel, window = self.plan[layer]
        paged_attention(q, cache, self.block_tables, self.token_seq, self.token_ctx, self.block_size, self.scale,
                        out=out, backend=kernel, window=window, softcap=self.softcap if kernel == "torch" else None)


class TorchAttention(AttentionBackend):
    name = "torch"

    @classmethod
    def unavailable(cls, arch, device, dtype):
        return None

    def prepare(self, batch: StepBatch) -> PagedStep:
        longest = batch.max_context_len
        # a window no shorter than every context in the step masks nothing: skip its mask
        plan = [("torch", w if w is not None and w < longest else None) for w in self.windows]
        return PagedStep(batch, self.device, self.scale, self.softcap, plan)


class CppAttention(AttentionBackend):
    name = "cpp"
    _DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, arch, device, dtype):
        super().__init__(arch, device, dtype)
        if self.softcap is not None or any(w is not None for w in self.windows):
            log.info("cpp attention: layers with soft-capping, or a sliding window shorter than the step's "
                     "longest context, run the torch path in that step")

    @classmethod
    def unavailable(cls, arch, device, dtype):
        if device.type != "cpu":
            return f"the C++ paged attention runs on CPU only, not on {device.type}"
        if dtype not in cls._DTYPES:
            return f"the C++ paged attention has no {dtype} kernel (float32, bfloat16)"
        if load_cpp_extension() is None:  # builds once (~15 s) or loads from the cache: at start, not on request 1
            return f"the C++ extension could not be built: {cpp_error()}"
        return None

    def prepare(self, batch: StepBatch) -> PagedStep:
        longest = batch.max_context_len
        plan = []
        for w in self.windows:
            w = w if w is not None and w < longest else None
            plan.append(("cpp", None) if w is None and self.softcap is None else ("torch", w))
        return PagedStep(batch, self.device, self.scale, self.softcap, plan)


class TritonStep(_StepTensors):
    """Per-step metadata of the Triton kernel: the common tensors plus the launch hints
    (longest context and query run, from host lists) and the query tile table (steps with a
    prefill chunk; None for decode)."""

    def __init__(self, batch: StepBatch, device: torch.device, arch: ModelArch, kernel):
        super().__init__(batch, device)
        self.max_context_len = batch.max_context_len
        self.max_query_len = batch.max_query_len
        block_t = kernel.tile_tokens(arch.num_heads, arch.num_kv_heads, self.max_query_len)
        # decode (one token per tile): the kernel's own token windows are that table already, and
        # launching without one is the variant the CUDA graphs compiled (no upload, no new compile)
        self.tiles = kernel.query_tiles(list(batch.query_lens), block_t, device) if block_t > 1 else None
        self.arch = arch
        self.kernel = kernel

    def forward(self, layer: int, q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> None:
        """Same contract as PagedStep.forward."""
        cache.index_copy_(0, self.slot_mapping, kv)
        a = self.arch
        self.kernel.paged_attention_triton(
            q, cache, self.block_tables, self.token_seq, self.token_ctx, self.block_size, a.attn_scale, out,
            max_context_len=self.max_context_len, max_query_len=self.max_query_len, tiles=self.tiles,
            sliding_window=a.layer_windows[layer], softcap=a.attn_softcap)


@dataclass(frozen=True)
class GraphTensors:
    """Static device tensors of a graph decode step of `size` rows (one token each); the graph's
    copy of the step's inputs writes them before every replay."""

    slot_mapping: torch.Tensor  # [size] int64: cache slot of each row's new K/V (padding: a scratch slot)
    block_tables: torch.Tensor  # [size, max_blocks] int32; row r is read only up to its context
    token_seq: torch.Tensor  # [size] int32: 0 .. size-1 (row r is sequence r)
    token_ctx: torch.Tensor  # [size] int32: positions each row attends to (padding: 1)
    block_size: int


class TritonGraphStep:
    """The Triton decode step a CUDA graph captures: nothing on the host depends on the step."""

    def __init__(self, t: GraphTensors, arch: ModelArch, kernel, config: dict, max_context_len: int):
        self.t = t
        self.arch = arch
        self.kernel = kernel
        self.config = config
        self.max_context_len = max_context_len

    def forward(self, layer: int, q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> None:
        """Same contract as PagedStep.forward."""
        t, a = self.t, self.arch
        cache.index_copy_(0, t.slot_mapping, kv)
        self.kernel.paged_attention_triton(
            q, cache, t.block_tables, t.token_seq, t.token_ctx, t.block_size, a.attn_scale, out,
            max_context_len=self.max_context_len, max_query_len=1, sliding_window=a.layer_windows[layer],
            softcap=a.attn_softcap, config=self.config)


class TritonAttention(AttentionBackend):
    name = "triton"
    _DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, arch, device, dtype):
        super().__init__(arch, device, dtype)
        from kernels import triton_paged_attention  # only now: a CPU server never imports triton

        self.kernel = triton_paged_attention

    @classmethod
    def unavailable(cls, arch, device, dtype):
        d = arch.head_dim
        if d < 16 or d & (d - 1):
            return f"the Triton paged attention needs a power-of-two head_dim >= 16, the model has {d}"
        if dtype not in cls._DTYPES:
            return f"the Triton paged attention has no {dtype} kernel"
        return triton_unavailable(device, "triton_paged_attention")

    def prepare(self, batch: StepBatch) -> TritonStep:
        return TritonStep(batch, self.device, self.arch, self.kernel)

    def graph_step(self, tensors: GraphTensors, max_context_len: int) -> TritonGraphStep:
        """The decode step of a CUDA graph over static device tensors (one token per row): launch
        sizes fixed for any context up to `max_context_len` (BLOCK_T 1, no tile table, the split
        count launch_config gives that length)."""
        a = self.arch
        size = tensors.token_ctx.shape[0]
        cfg = self.kernel.launch_config(self.device, size, a.num_kv_heads, a.head_dim,
                                        torch.empty((), dtype=self.dtype).element_size(), max_context_len)
        return TritonGraphStep(tensors, a, self.kernel, dict(cfg, BLOCK_T=1), max_context_len)


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    b.name: b for b in (CppAttention, TorchAttention, TritonAttention)}
# What `auto` tries, in order, per device type.
AUTO_ATTENTION = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}
