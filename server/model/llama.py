"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat ragged batch.

All tokens of all sequences of a step form one `[T, hidden]` tensor; attention reads
and writes the paged KV cache through per-step metadata, so prefill chunks and decodes
run in the same forward. Every LoRA-targeted linear is the base GEMM plus, when the step
has adapter tokens, `lora.apply(...)` with the step's shared segment table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_attention
from server.model.arch import ModelArch
from server.model.loading import ModelWeights
from server.model.rope import RotaryEmbedding


class LoraApplier(Protocol):
    """Adds each token's adapter delta to a base projection output, in place."""

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """module in ("qkv", "o", "gate_up", "down"); x [T, in], y [T, out]."""


@dataclass
class AttentionMetadata:
    """Built once per step by the runner; shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: KV-cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32, one row per sequence in the step
    token_seq: torch.Tensor  # [T] int32: block-table row of each token
    token_ctx: torch.Tensor  # [T] int32: cache positions each token attends to (causal)
    block_size: int


class LlamaModel:
    def __init__(self, arch: ModelArch, weights: ModelWeights, max_positions: int):
        self.arch = arch
        self.w = weights
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.rope = RotaryEmbedding(arch.rope, arch.head_dim, max_positions, self.dtype, self.device)
        self.scale = arch.head_dim ** -0.5
        self._split = (arch.num_heads, arch.num_kv_heads, arch.num_kv_heads)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,  # [num_layers, S, 2, kv_heads, head_dim]
        lora: LoraApplier | None = None,
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden] (after the last norm)."""
        a = self.arch
        T = input_ids.shape[0]
        cos, sin = self.rope.tables(positions)
        hidden = F.embedding(input_ids, self.w.embed)
        attn_out = torch.empty(T, a.num_heads, a.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.w.layers):
            x = F.rms_norm(hidden, (a.hidden_size,), layer.input_norm, a.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            if lora is not None:
                lora.apply(i, "qkv", x, qkv)
            heads = qkv.view(T, a.num_heads + 2 * a.num_kv_heads, a.head_dim)
            q_k = heads[:, : a.num_heads + a.num_kv_heads]
            self.rope.apply(q_k, cos, sin)
            kv = heads[:, a.num_heads:].view(T, 2, a.num_kv_heads, a.head_dim)
            layer_cache = kv_cache[i]
            layer_cache.index_copy_(0, attn.slot_mapping, kv)
            paged_attention(heads[:, : a.num_heads], layer_cache, attn.block_tables, attn.token_seq,
                            attn.token_ctx, attn.block_size, self.scale, out=attn_out)
            o_in = attn_out.view(T, a.q_size)
            o = F.linear(o_in, layer.o, layer.o_bias)
            if lora is not None:
                lora.apply(i, "o", o_in, o)
            hidden = o.add_(hidden)

            x = F.rms_norm(hidden, (a.hidden_size,), layer.post_norm, a.rms_norm_eps)
            gate_up = F.linear(x, layer.gate_up)
            if lora is not None:
                lora.apply(i, "gate_up", x, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate).mul_(up)
            down = F.linear(act, layer.down)
            if lora is not None:
                lora.apply(i, "down", act, down)
            hidden = down.add_(hidden)
        return F.rms_norm(hidden, (a.hidden_size,), self.w.norm, a.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, vocab] float32."""
        return F.linear(hidden, self.w.lm_head).float()
