"""Hugging Face safetensors directory -> fused, device-resident weights for `LlamaModel`.

q/k/v are fused into one `qkv` matrix and gate/up into one `gate_up` matrix, so each
decoder layer runs four GEMMs instead of seven. Pickle checkpoints are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from server.model.arch import ModelArch, UnsupportedModelError


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2*kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2*kv_size]
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2*intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as `embed` when tied


class _Checkpoint:
    """Name -> tensor over all safetensors shards of a directory."""

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded)" if pickles else ""
            raise UnsupportedModelError(f"{path}: no *.safetensors weights{hint}")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UnsupportedModelError(f"checkpoint is missing tensor {name!r}")
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def load_weights(path: str | Path, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    ckpt = _Checkpoint(Path(path))

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = ckpt.get(name)
        if tuple(t.shape) != shape:
            raise UnsupportedModelError(f"{name}: shape {tuple(t.shape)} does not match config {shape}")
        return t.to(dtype=dtype, device=device).contiguous()

    def maybe(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return get(name, shape) if ckpt.has(name) else None

    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        biases = [maybe(f"{p}self_attn.{m}_proj.bias", (n,)) for m, n in (("q", q), ("k", kv), ("v", kv))]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise UnsupportedModelError(f"layer {i}: q/k/v biases must be all present or all absent")
        layers.append(LayerWeights(
            input_norm=get(f"{p}input_layernorm.weight", (h,)),
            qkv=torch.cat([get(f"{p}self_attn.q_proj.weight", (q, h)),
                           get(f"{p}self_attn.k_proj.weight", (kv, h)),
                           get(f"{p}self_attn.v_proj.weight", (kv, h))]),
            qkv_bias=torch.cat(biases) if biases[0] is not None else None,
            o=get(f"{p}self_attn.o_proj.weight", (h, q)),
            o_bias=maybe(f"{p}self_attn.o_proj.bias", (h,)),
            post_norm=get(f"{p}post_attention_layernorm.weight", (h,)),
            gate_up=torch.cat([get(f"{p}mlp.gate_proj.weight", (inter, h)),
                               get(f"{p}mlp.up_proj.weight", (inter, h))]),
            down=get(f"{p}mlp.down_proj.weight", (h, inter)),
        ))
    embed = get("model.embed_tokens.weight", (arch.vocab_size, h))
    lm_head = embed if arch.tie_word_embeddings else get("lm_head.weight", (arch.vocab_size, h))
    return ModelWeights(embed=embed, layers=layers, norm=get("model.norm.weight", (h,)), lm_head=lm_head)
