"""The model-family registry: one entry per decoder architecture this server runs.

An entry says, as data, everything that differs between families: the checkpoint names of
each decoder layer's weights and how they pack into the four fused linears the runtime
runs (`qkv`, `o`, `gate_up`, `down`); the PEFT module names adapters target (they are the
checkpoint's module names, so a checkpoint that already fuses `qkv_proj` is adapted on the
fused name); the norms and their placement; the activation; which config options the
family honours. `ModelArch`, the loader, the decoder, the adapter slots and the adapter
validator read it; none of them names a family. Adding a family = one `Family` here + its
case in tests/test_model_families.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

# Runtime fused linear -> its output components, in output order (widths come from ModelArch).
GROUP_COMPONENTS: dict[str, tuple[str, ...]] = {
    "qkv": ("q", "kv", "kv"),
    "o": ("hidden",),
    "gate_up": ("intermediate", "intermediate"),
    "down": ("hidden",),
}
# Input width of each fused linear.
GROUP_INPUT = {"qkv": "hidden", "o": "q", "gate_up": "hidden", "down": "intermediate"}

SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
SOFTCAP_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


@dataclass(frozen=True)
class Norms:
    """Checkpoint names (inside `model.layers.{i}.`) of a layer's RMSNorm weights; None = absent."""

    attn_in: str = "input_layernorm"
    mlp_in: str = "post_attention_layernorm"
    attn_out: str | None = None  # applied to the attention output before the residual add
    mlp_out: str | None = None  # applied to the MLP output before the residual add
    q: str | None = None  # per-head RMSNorm over head_dim on q, before RoPE
    k: str | None = None


@dataclass(frozen=True, eq=False)
class Family:
    name: str  # shown by /v1/models
    display: str  # for messages
    architectures: tuple[str, ...]  # config.json `architectures` entries
    model_types: tuple[str, ...]  # config.json `model_type` values
    # Fused runtime linear -> checkpoint modules (inside `model.layers.{i}.`) packed into it, in
    # output order. Each module is also the PEFT target of that name (its last dotted part).
    linears: dict[str, tuple[str, ...]]
    norms: Norms = Norms()
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma stores w - 1
    # transformers' RMSNorm of this family rounds the float32-normalised x to the model dtype before
    # the scale (Llama-style), rather than scaling in float32 and rounding once (Gemma-style)
    norm_rounds_before_scale: bool = True
    activation_key: str = "hidden_act"
    bias: str = "attention_bias"  # "attention_bias": q/k/v/o bias iff the config says; "qkv": always q/k/v
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    # transformers' defaults of this family's config class where they differ from arch.py's generic
    # fallbacks: what a config.json that leaves a key out means (hub configs saved as a diff against
    # the defaults leave out `tie_word_embeddings` where it is the default: Gemma's, tied).
    config_defaults: dict[str, object] = field(default_factory=dict)
    # The soft-caps transformers applies for this family, of SOFTCAP_KEYS; a family with none refuses
    # them. Gemma 3's config class has attn_logit_softcapping but its attention never reads it: ignored.
    softcaps: tuple[str, ...] = ()
    query_pre_attn_scalar: bool = False  # attention scale = query_pre_attn_scalar ** -0.5
    # Sliding windows: "none" (refused if set), "all" (every layer, if `sliding_window`), or
    # "layer_types" (per `layer_types`; `default_layer_types(cfg, i)` when the config has none).
    sliding: str = "none"
    default_layer_types: Callable[[dict, int], str] | None = None
    sliding_enabled_key: str | None = None  # a config flag that must be true for any window to apply
    # RoPE per layer type: `rope_parameters` nested by layer type are read; legacy configs give the
    # sliding layers a default RoPE of base `local_rope_theta_key` (the full layers keep the top-level one).
    per_layer_rope: bool = False
    local_rope_theta_key: str | None = None
    peft_default_targets: tuple[str, ...] | None = ("q_proj", "v_proj")  # PEFT's per-model default

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """PEFT module names adapters may target, in layer order."""
        return tuple(m.rsplit(".", 1)[1] for mods in self.linears.values() for m in mods)


_SPLIT = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
_FUSED = {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_up_proj",),
          "down": ("mlp.down_proj",)}


def _qwen_layer_type(cfg: dict, i: int) -> str:
    # transformers' Qwen2/Qwen3 default: windows only from layer `max_window_layers` on.
    return "sliding_attention" if i >= int(cfg.get("max_window_layers", 28)) else "full_attention"


def _alternating_layer_type(cfg: dict, i: int) -> str:
    return "sliding_attention" if (i + 1) % 2 else "full_attention"


def _gemma3_layer_type(cfg: dict, i: int) -> str:
    # transformers' Gemma 3 default: every `sliding_window_pattern`-th layer is global.
    return "sliding_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) else "full_attention"


_QWEN_DEFAULTS = {"max_position_embeddings": 32768, "sliding_window": 4096, "num_key_value_heads": 32}
_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "num_key_value_heads": 4,
                   "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096}

_GEMMA_NORMS = Norms(mlp_in="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                     mlp_out="post_feedforward_layernorm")


FAMILIES: tuple[Family, ...] = (
    Family("llama", "Llama 2/3/3.x, SmolLM", ("LlamaForCausalLM",), ("llama",), _SPLIT),
    Family("mistral", "Mistral", ("MistralForCausalLM",), ("mistral",), _SPLIT, bias="none", sliding="all",
           config_defaults={"max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8}),
    Family("qwen2", "Qwen2/2.5", ("Qwen2ForCausalLM",), ("qwen2",), _SPLIT, bias="qkv", sliding="layer_types",
           default_layer_types=_qwen_layer_type, sliding_enabled_key="use_sliding_window",
           config_defaults=_QWEN_DEFAULTS),
    Family("qwen3", "Qwen3", ("Qwen3ForCausalLM",), ("qwen3",), _SPLIT,
           norms=Norms(q="self_attn.q_norm", k="self_attn.k_norm"), sliding="layer_types",
           default_layer_types=_qwen_layer_type, sliding_enabled_key="use_sliding_window",
           config_defaults={**_QWEN_DEFAULTS, "head_dim": 128}),
    Family("gemma2", "Gemma 2", ("Gemma2ForCausalLM",), ("gemma2",), _SPLIT,
           norms=_GEMMA_NORMS, norm_offset=1.0, norm_rounds_before_scale=False, activation_key="hidden_activation",
           embed_scale=True, softcaps=SOFTCAP_KEYS, query_pre_attn_scalar=True, sliding="layer_types",
           default_layer_types=_alternating_layer_type,
           config_defaults={**_GEMMA_DEFAULTS, "max_position_embeddings": 8192, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0}),
    Family("gemma3_text", "Gemma 3 (text)", ("Gemma3ForCausalLM",), ("gemma3_text",), _SPLIT,
           norms=replace(_GEMMA_NORMS, q="self_attn.q_norm", k="self_attn.k_norm"), norm_offset=1.0,
           norm_rounds_before_scale=False, activation_key="hidden_activation", embed_scale=True,
           softcaps=("final_logit_softcapping",), query_pre_attn_scalar=True, sliding="layer_types",
           default_layer_types=_gemma3_layer_type, per_layer_rope=True, local_rope_theta_key="rope_local_base_freq",
           config_defaults={**_GEMMA_DEFAULTS, "max_position_embeddings": 131072, "rope_theta": 1000000.0}),
    Family("phi3", "Phi-3", ("Phi3ForCausalLM",), ("phi3",), _FUSED, bias="none", sliding="all",
           peft_default_targets=None, config_defaults={"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}),
)


def supported() -> str:
    """The supported architectures, for error messages."""
    return "; ".join(f"{', '.join(f.architectures)} ({f.display})" for f in FAMILIES)


def family_for(architectures: list[str], model_type: str) -> Family | None:
    """The entry for a config's `architectures` (first known one), else its `model_type`."""
    for arch in architectures:
        for family in FAMILIES:
            if arch in family.architectures:
                return family
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_named(name: str) -> Family | None:
    """The entry whose `name` or one of whose `model_types` is `name`."""
    return next((f for f in FAMILIES if name == f.name or name in f.model_types), None)


# PEFT module name -> the decoder block it lives in ("self_attn" / "mlp"), over every family.
BLOCK_OF: dict[str, str] = {
    m.rsplit(".", 1)[1]: m.rsplit(".", 1)[0] for f in FAMILIES for mods in f.linears.values() for m in mods
}
