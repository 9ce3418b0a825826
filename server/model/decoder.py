"""The decoder forward over a flat ragged batch, for every family in the registry.

All tokens of all sequences of a step form one `[T, hidden]` tensor; attention reads
and writes the paged KV cache through per-step metadata, so prefill chunks and decodes
run in the same forward. What differs between families (norm placement, q/k norms,
activation, windows, soft-capping, embedding scale) is read from `ModelArch`; no family is
named here. LoRA is not the model's business either: every fused linear goes through
`_linear`, which adds the step's adapter deltas when there are any.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from server.model.arch import ModelArch
from server.model.loading import LayerWeights, ModelWeights
from server.model.rope import RotaryEmbedding

_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LoraApplier(Protocol):
    """Adds each token's adapter delta to a base projection output, in place."""

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> None:
        """group in ("qkv", "o", "gate_up", "down"); x [T, in], y [T, out] = x W^T + bias; bias [out]
        or None (DoRA rescales the non-bias part of y)."""


class AttentionStep(Protocol):
    """One step's attention, built by the engine's attention backend and shared by every layer;
    the backend applies the layer's sliding window and soft-capping (from the same ModelArch)."""

    def forward(self, layer: int, q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> None:
        """Write kv [T, 2, KVH, D] (this step's keys/values) into cache [S, 2, KVH, D] (this layer's
        paged cache), then out [T, H, D] = attention of q [T, H, D] over each token's context."""


class DecoderModel:
    def __init__(self, arch: ModelArch, weights: ModelWeights, max_positions: int):
        self.arch = arch
        self.w = weights
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        # One table per distinct RoPE (local and global layers may differ), shared by its layers.
        self.ropes = {r: RotaryEmbedding(r, arch.head_dim, max_positions, self.dtype, self.device)
                      for r in dict.fromkeys(arch.layer_ropes)}
        self.act = _ACTIVATIONS[arch.activation]
        # In 16-bit, the norm's rounding order matters: the README prompt's first token in bf16 was
        # "L'" instead of transformers' "The" while the scale came before the rounding (Llama).
        self.norm_rounds = self.dtype != torch.float32 and arch.family.norm_rounds_before_scale
        # As transformers: the scale is rounded to the weights' dtype before it multiplies.
        self.embed_scale = (torch.tensor(arch.hidden_size ** 0.5, dtype=self.dtype).item()
                            if arch.family.embed_scale else None)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn: AttentionStep,
        kv_cache: torch.Tensor,  # [num_layers, S, 2, kv_heads, head_dim]
        lora: LoraApplier | None = None,
    ) -> torch.Tensor:
        """-> final hidden states [T, hidden] (after the last norm)."""
        a = self.arch
        T = input_ids.shape[0]
        tables = {r: rope.tables(positions) for r, rope in self.ropes.items()}
        hidden = F.embedding(input_ids, self.w.embed)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        attn_out = torch.empty(T, a.num_heads, a.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.w.layers):
            x = self._norm(hidden, layer.attn_in_norm)
            qkv = self._linear(i, "qkv", x, layer.qkv, layer.qkv_bias, lora)
            heads = qkv.view(T, a.num_heads + 2 * a.num_kv_heads, a.head_dim)
            if layer.q_norm is not None:
                self._qk_norm(heads, layer)
            q_k = heads[:, : a.num_heads + a.num_kv_heads]
            self.ropes[a.layer_ropes[i]].apply(q_k, *tables[a.layer_ropes[i]])
            kv = heads[:, a.num_heads:].view(T, 2, a.num_kv_heads, a.head_dim)
            attn.forward(i, heads[:, : a.num_heads], kv, kv_cache[i], attn_out)
            o = self._linear(i, "o", attn_out.view(T, a.q_size), layer.o, layer.o_bias, lora)
            if layer.attn_out_norm is not None:
                o = self._norm(o, layer.attn_out_norm)
            hidden = o.add_(hidden)

            x = self._norm(hidden, layer.mlp_in_norm)
            gate, up = self._linear(i, "gate_up", x, layer.gate_up, None, lora).chunk(2, dim=-1)
            act = self.act(gate).mul_(up)
            down = self._linear(i, "down", act, layer.down, None, lora)
            if layer.mlp_out_norm is not None:
                down = self._norm(down, layer.mlp_out_norm)
            hidden = down.add_(hidden)
        return self._norm(hidden, self.w.norm)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, vocab] float32."""
        logits = F.linear(hidden, self.w.lm_head).float()
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap).mul_(cap)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim, rounded as the family's transformers code rounds it."""
        if self.norm_rounds:  # normalise in float32, round to the model dtype, then scale
            return F.rms_norm(x.float(), (x.shape[-1],), None, self.arch.rms_norm_eps).to(self.dtype).mul_(weight)
        return F.rms_norm(x, (x.shape[-1],), weight, self.arch.rms_norm_eps)

    def _qk_norm(self, heads: torch.Tensor, layer: LayerWeights) -> None:
        """Per-head RMSNorm of q and k over head_dim, in place ([T, H + 2*KVH, D] view)."""
        a = self.arch
        q, k = heads[:, : a.num_heads], heads[:, a.num_heads: a.num_heads + a.num_kv_heads]
        q.copy_(self._norm(q, layer.q_norm))
        k.copy_(self._norm(k, layer.k_norm))

    @staticmethod
    def _linear(layer: int, group: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora: LoraApplier | None) -> torch.Tensor:
        """The base fused linear, plus this step's adapter deltas (if any) for the same group."""
        y = F.linear(x, weight, bias)
        if lora is not None:
            lora.apply(layer, group, x, y, bias)
        return y
