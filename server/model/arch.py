"""The shape of a decoder model, read from a Hugging Face `config.json` through the family registry.

Everything the runner, the KV cache and the adapter validator need to know about the base
model lives in `ModelArch`; nothing else reads `config.json`. What differs between families
is data in `server/model/families.py`; this module only reads the options a family honours
and refuses every option it cannot run exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from server.model.families import (
    GROUP_COMPONENTS, GROUP_INPUT, SOFTCAP_KEYS, SUPPORTED_ACTIVATIONS, SUPPORTED_LAYER_TYPES, Family, family_for,
    supported,
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


class UnsupportedModelError(ValueError):
    """The model directory holds something this server cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    attention_factor: float = 1.0  # cos/sin multiplier (yarn's mscale)
    partial_rotary_factor: float = 1.0  # fraction of head_dim rotated (the rest passes through)
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within the original length
    # Positions past this need frequencies transformers derives per batch (dynamic, longrope): refused.
    max_exact_positions: int | None = None


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    family: Family = field(repr=False)  # the registry entry: layout and options of this family
    layer_ropes: tuple[RopeConfig, ...] = ()  # per layer (families with local and global RoPE differ by layer)
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window (tokens, self included) or None
    activation: str = "silu"
    attn_scale: float = 0.0  # softmax scale; 0 = head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """PEFT module names adapters may target on this model, in layer order."""
        return self.family.lora_targets

    @property
    def lora_groups(self) -> dict[str, tuple[str, ...]]:
        """Fused runtime linear -> the PEFT modules it stacks, in output order."""
        return {g: tuple(m.rsplit(".", 1)[1] for m in mods) for g, mods in self.family.linears.items()}

    def _width(self, component: str) -> int:
        return {"hidden": self.hidden_size, "intermediate": self.intermediate_size,
                "q": self.q_size, "kv": self.kv_size}[component]

    def group_shape(self, group: str) -> tuple[int, int]:
        """(in_features, out_features) of fused linear `group` ("qkv", "o", "gate_up", "down")."""
        return self._width(GROUP_INPUT[group]), sum(self._width(c) for c in GROUP_COMPONENTS[group])

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of PEFT module `module` (one of `lora_targets`)."""
        for group, modules in self.lora_groups.items():
            if module in modules:
                components = GROUP_COMPONENTS[group]
                if len(modules) == 1:
                    return self.group_shape(group)
                return self._width(GROUP_INPUT[group]), self._width(components[modules.index(module)])
        raise KeyError(f"{module!r} is not a projection of {self.model_type}: {', '.join(self.lora_targets)}")

    def weight_params(self) -> int:
        """Parameters read by the weight GEMMs for one token (all layers + lm_head)."""
        per_layer = sum(a * b for a, b in (self.group_shape(g) for g in GROUP_COMPONENTS))
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size

    @classmethod
    def from_hf_config(cls, cfg: dict, generation_cfg: dict | None = None) -> ModelArch:
        archs = list(cfg.get("architectures") or [])
        model_type = str(cfg.get("model_type", ""))
        family = family_for(archs, model_type)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or model_type!r}: loramux runs {supported()}")
        where = f"{family.display} checkpoint"
        cfg = {**family.config_defaults, **cfg}  # a key left out means the family's default (an explicit null stays)
        quantization = cfg.get("quantization_config")
        if quantization:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            raise UnsupportedModelError(f"{where}: quantized checkpoints are not supported (quant_method "
                                        f"{method!r}); serve the unquantized model")
        activation = cfg.get(family.activation_key) or "silu"
        if activation not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"{where}: unsupported {family.activation_key} {activation!r}; "
                                        f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{where}: unsupported option mlp_bias=true")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{where}: unsupported option use_bidirectional_attention=true")

        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_layers = int(cfg["num_hidden_layers"])
        attention_bias = bool(cfg.get("attention_bias", False))
        if family.bias == "none" and attention_bias:
            raise UnsupportedModelError(f"{where}: unsupported option attention_bias=true")
        if not family.softcaps and any(cfg.get(k) for k in SOFTCAP_KEYS):
            raise UnsupportedModelError(f"{where}: logit soft-capping is not part of this family")
        softcaps = [float(cfg[k]) if k in family.softcaps and cfg.get(k) else None for k in SOFTCAP_KEYS]

        types = _layer_types(cfg, family, num_layers, where)
        ropes = _ropes_by_layer_type(cfg, family, where)
        eos: list[int] = []
        for source in (cfg, generation_cfg or {}):
            value = source.get("eos_token_id")
            for tok in value if isinstance(value, list) else [value]:
                if tok is not None and int(tok) not in eos:
                    eos.append(int(tok))

        return cls(
            model_type=family.name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family.bias == "qkv" or attention_bias,
            o_bias=family.bias == "attention_bias" and attention_bias,
            family=family,
            layer_ropes=tuple(ropes[t] for t in types),
            layer_windows=_layer_windows(cfg, family, types, where),
            activation=activation,
            attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5
            if family.query_pre_attn_scalar and cfg.get("query_pre_attn_scalar") else head_dim ** -0.5,
            attn_softcap=softcaps[0],
            final_softcap=softcaps[1],
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos),
            name=str(cfg.get("_name_or_path") or ""),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArch:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UnsupportedModelError(f"{path}: no config.json (expected a Hugging Face model directory)")
        cfg = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        arch = cls.from_hf_config(cfg, gen)
        return arch if arch.name else replace(arch, name=path.name)


def _layer_types(cfg: dict, family: Family, num_layers: int, where: str) -> tuple[str, ...]:
    """Each layer's attention kind: "full_attention" or "sliding_attention"."""
    if family.sliding != "layer_types":
        return ("full_attention",) * num_layers
    types = cfg.get("layer_types") or [family.default_layer_types(cfg, i) for i in range(num_layers)]
    if len(types) < num_layers:
        raise UnsupportedModelError(f"{where}: layer_types has {len(types)} entries for {num_layers} layers")
    for t in types:
        if t not in SUPPORTED_LAYER_TYPES:
            raise UnsupportedModelError(f"{where}: unsupported layer type {t!r}; supported: "
                                        f"{', '.join(SUPPORTED_LAYER_TYPES)}")
    return tuple(types[:num_layers])


def _layer_windows(cfg: dict, family: Family, types: tuple[str, ...], where: str) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if family.sliding_enabled_key is not None and not cfg.get(family.sliding_enabled_key, False):
        window = None
    if family.sliding == "none" and window:
        raise UnsupportedModelError(f"{where}: unsupported option sliding_window={window}")
    if family.sliding == "all":
        return (int(window) if window else None,) * len(types)
    return tuple(int(window) if window and t == "sliding_attention" else None for t in types)


def _ropes_by_layer_type(cfg: dict, family: Family, where: str) -> dict[str, RopeConfig]:
    # transformers >= 5 writes `rope_parameters` (nested by layer type where the family has several);
    # older configs `rope_theta` + `rope_scaling` (+ a local base for the sliding layers).
    params = dict(cfg.get("rope_parameters") or {})
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    if nested:
        if not family.per_layer_rope or set(nested) != set(SUPPORTED_LAYER_TYPES):
            raise UnsupportedModelError(f"{where}: unsupported per-layer-type RoPE parameters {sorted(nested)}")
        return {t: _rope_config(cfg, d, where) for t, d in nested.items()}
    rope = _rope_config(cfg, {**(cfg.get("rope_scaling") or {}), **params}, where)
    ropes = dict.fromkeys(SUPPORTED_LAYER_TYPES, rope)
    if family.local_rope_theta_key is not None:
        ropes["sliding_attention"] = RopeConfig(theta=float(cfg.get(family.local_rope_theta_key) or 10000.0))
    return ropes


def _rope_config(cfg: dict, params: dict, where: str) -> RopeConfig:
    """One RoPE from its parameter dict (`cfg` supplies the model-wide fallbacks)."""
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    # As transformers: a top-level original_max_position_embeddings (Phi-3) wins over the rope dict's.
    original = int(cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings", 2048))
    if rope_type == "dynamic":  # transformers rescales only past max_position_embeddings
        original = int(cfg.get("max_position_embeddings", 2048))
    factor = float(params.get("factor") or 1.0)
    if rope_type in ("yarn", "longrope") and not params.get("factor"):
        factor = int(cfg.get("max_position_embeddings", 2048)) / original
    attention_factor = 1.0
    if rope_type == "longrope":
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    if rope_type == "yarn":
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                                if mscale and mscale_all else _yarn_mscale(factor))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
        partial_rotary_factor=float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) or 1.0),
        short_factor=tuple(float(f) for f in params.get("short_factor") or ()),
        max_exact_positions=original if rope_type in ("dynamic", "longrope") else None,
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
