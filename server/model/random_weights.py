"""Random weights of a model's shapes, made on the device (vLLM's `--load-format dummy`).

For benchmarks at a real model's size without a checkpoint: an 8B model is generated on a GPU
in well under a second, where writing and reading back 16 GB of safetensors takes minutes.
Nothing reads a file; the result is the same `ModelWeights` that `load_weights` returns.
"""

from __future__ import annotations

import torch

from server.model.arch import ModelArch
from server.model.loading import LayerWeights, ModelWeights


def random_weights(arch: ModelArch, dtype: torch.dtype, device: torch.device, seed: int = 0,
                   std: float = 0.02) -> ModelWeights:
    """Normal(0, std) matrices and biases, norm weights 1 (as a fresh transformers model)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    n = arch.family.norms

    def norm(name: str | None, size: int) -> torch.Tensor | None:
        """A norm the family has, at its effective scale 1 (what loading makes of a fresh checkpoint)."""
        return None if name is None else ones(size)

    layers = [
        LayerWeights(
            attn_in_norm=ones(h),
            qkv=normal(q + 2 * kv, h),
            qkv_bias=normal(q + 2 * kv) if arch.qkv_bias else None,
            o=normal(h, q),
            o_bias=normal(h) if arch.o_bias else None,
            mlp_in_norm=ones(h),
            gate_up=normal(2 * inter, h),
            down=normal(h, inter),
            attn_out_norm=norm(n.attn_out, h),
            mlp_out_norm=norm(n.mlp_out, h),
            q_norm=norm(n.q, arch.head_dim),
            k_norm=norm(n.k, arch.head_dim),
        )
        for _ in range(arch.num_layers)
    ]
    embed = normal(arch.vocab_size, h)
    lm_head = embed if arch.tie_word_embeddings else normal(arch.vocab_size, h)
    return ModelWeights(embed=embed, layers=layers, norm=ones(h), lm_head=lm_head)
