"""Hugging Face safetensors directory -> fused, device-resident weights for `DecoderModel`.

The family registry says which checkpoint modules pack into each fused linear (q/k/v -> `qkv`,
gate/up -> `gate_up`, or a checkpoint's own `qkv_proj` / `gate_up_proj` as is), so each decoder
layer runs four GEMMs whatever the family. Norm weights are stored ready to multiply: a
family whose RMSNorm scales by (1 + w) gets 1 + w here. Pickle checkpoints are never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from server.model.arch import ModelArch, UnsupportedModelError


@dataclass
class LayerWeights:
    attn_in_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2*kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2*kv_size]
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    mlp_in_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2*intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    attn_out_norm: torch.Tensor | None = None  # [hidden], on the attention output (sandwich norms)
    mlp_out_norm: torch.Tensor | None = None  # [hidden], on the MLP output
    q_norm: torch.Tensor | None = None  # [head_dim], per head, before RoPE
    k_norm: torch.Tensor | None = None  # [head_dim]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as `embed` when tied


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UnsupportedModelError(f"checkpoint is missing tensor {name!r}")
        with safe_open(str(self._where[name]), framework="pt") as handle:
            t = handle.get_tensor(name)
        # An 8-bit or integer weight is a quantized one: cast without its scales it is a wrong weight.
        if t.dtype not in _FLOATS:
            raise UnsupportedModelError(f"{name}: dtype {t.dtype} is not a 16-, 32- or 64-bit float (a "
                                        f"quantized checkpoint? loramux loads float16, bfloat16 and float32 weights)")
        return t


def load_weights(path: str | Path, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    ckpt = _Checkpoint(Path(path))
    fam = arch.family

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = ckpt.get(name)
        if tuple(t.shape) != shape:
            raise UnsupportedModelError(f"{name}: shape {tuple(t.shape)} does not match config {shape}")
        return t.to(dtype=dtype, device=device).contiguous()

    def norm(name: str | None, size: int) -> torch.Tensor | None:
        if name is None:
            return None
        name += ".weight"
        w = ckpt.get(name)
        if tuple(w.shape) != (size,):
            raise UnsupportedModelError(f"{name}: shape {tuple(w.shape)} does not match config {(size,)}")
        return (w.float() + fam.norm_offset).to(dtype=dtype, device=device)

    def fused(prefix: str, group: str, suffix: str) -> torch.Tensor:
        """The checkpoint modules of fused linear `group`, concatenated along out."""
        parts = []
        for module in fam.linears[group]:
            n_in, n_out = arch.linear_shape(module.rsplit(".", 1)[1])
            shape = (n_out, n_in) if suffix == "weight" else (n_out,)
            parts.append(get(f"{prefix}{module}.{suffix}", shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    h, n = arch.hidden_size, fam.norms
    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_in_norm=norm(p + n.attn_in, h),
            qkv=fused(p, "qkv", "weight"),
            qkv_bias=fused(p, "qkv", "bias") if arch.qkv_bias else None,
            o=fused(p, "o", "weight"),
            o_bias=fused(p, "o", "bias") if arch.o_bias else None,
            mlp_in_norm=norm(p + n.mlp_in, h),
            gate_up=fused(p, "gate_up", "weight"),
            down=fused(p, "down", "weight"),
            attn_out_norm=norm(n.attn_out and p + n.attn_out, h),
            mlp_out_norm=norm(n.mlp_out and p + n.mlp_out, h),
            q_norm=norm(n.q and p + n.q, arch.head_dim),
            k_norm=norm(n.k and p + n.k, arch.head_dim),
        ))
    embed = get("model.embed_tokens.weight", (arch.vocab_size, h))
    lm_head = embed if arch.tie_word_embeddings else get("lm_head.weight", (arch.vocab_size, h))
    return ModelWeights(embed=embed, layers=layers, norm=norm("model.norm", h), lm_head=lm_head)


def base_linear_weight(weights: ModelWeights, arch: ModelArch, layer: int, module: str) -> torch.Tensor:
    """The base weight W [out, in] of PEFT module `module` (e.g. "k_proj") of decoder layer `layer`:
    a view of its rows of the fused linear (for DoRA's weight norms). KeyError if `module` is not
    one of arch.lora_targets."""
    for group, modules in arch.lora_groups.items():
        if module in modules:
            fused = getattr(weights.layers[layer], group)  # LayerWeights names its fields after the groups
            i = modules.index(module)
            lo = sum(arch.linear_shape(m)[1] for m in modules[:i])
            return fused[lo: lo + arch.linear_shape(module)[1]]
    raise KeyError(f"{module!r} is not a projection of {arch.model_type}: {', '.join(arch.lora_targets)}")
