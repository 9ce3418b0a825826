"""Every family in the registry equals transformers (and PEFT), through the engine.

Per family: a tiny random checkpoint from a transformers config with the family's options
switched on (windows shorter than the prompts, soft-caps that bite, odd head_dims, scaled
RoPE); a batch of prompts of different lengths, prefilled in chunks of 16 tokens, half of
the requests on a PEFT adapter that targets every projection kind the family has, half on
the base. Each reference runs alone in transformers / PEFT (batch 1, fp32, greedy).
Then: checkpoints of an unsupported family or option are refused at start, by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from engine_runs import greedy_with_logprobs
from peft_adapters import greedy, make_peft_adapter
from server.config import Config
from server.engine.engine import LLMEngine
from server.model.arch import ModelArch, UnsupportedModelError

NEW = 12
LENGTHS = (3, 13, 37)
SPLIT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# case -> (model_type, config overrides, adapter target_modules)
CASES = {
    "llama3-rope-tied-bias": ("llama", dict(
        tie_word_embeddings=True, attention_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32)), SPLIT),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
                          SPLIT),
    "llama-yarn-rope": ("llama", dict(max_position_embeddings=512, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)), SPLIT),
    "llama-dynamic-rope": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
                           SPLIT),
    "mistral-head-dim-window": ("mistral", dict(head_dim=24, sliding_window=8), SPLIT),
    "qwen2-bias": ("qwen2", dict(), SPLIT),
    "qwen2-window-from-layer-1": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
                                  ["q_proj", "v_proj", "down_proj"]),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=24), SPLIT),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=1.5,
                              final_logit_softcapping=6.0, tie_word_embeddings=True), SPLIT),
    # attn_logit_softcapping: in Gemma 3's config class, unused by its attention (transformers ignores it)
    "gemma3-text": ("gemma3_text", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=True, attn_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                         "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0)}), SPLIT),
    # LongRoPE within the original length (the short factors); max_model_len 64 = that length.
    "phi3-longrope": ("phi3", dict(pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=64,
                                   rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                        short_factor=[1.0, 1.3, 1.9, 2.5, 4.0, 6.0, 9.0, 14.0],
                                                        long_factor=[2.0] * 8)),
                      ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "phi3-fused": ("phi3", dict(sliding_window=12, partial_rotary_factor=0.5, pad_token_id=0),
                   ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def references(model_dir: Path, adapter_dir: Path, jobs: list[tuple[str | None, list[int]]]):
    """PEFT alone on each job (batch 1); base-only jobs with the adapter disabled."""
    import contextlib

    import peft
    import transformers

    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    results = []
    for adapter, prompt in jobs:
        with contextlib.nullcontext() if adapter else model.disable_adapter():
            results.append(greedy(model, prompt, NEW))
    return results


def make_engine(model_dir: Path, adapter_dir: Path, max_model_len: int | None = None,
                dtype: str = "float32") -> LLMEngine:
    cfg = Config()
    cfg.model.max_model_len = max_model_len
    cfg.model.dtype = dtype
    cfg.model.device = "cpu"
    cfg.cache.kv_cache_memory = 4 << 20
    cfg.scheduler.max_num_batched_tokens = 16  # every prompt but the shortest is prefilled in chunks
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {"fam": str(adapter_dir)}
    cfg.lora.max_lora_rank = 8
    return LLMEngine(cfg, model_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_family_equals_transformers_and_peft(case, tmp_path):
    model_type, overrides, targets = CASES[case]
    model_dir = save_tiny_model(tmp_path / "model", model_type, seed=3, num_hidden_layers=2, **overrides)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "adapter", seed=4, std=0.2, r=8, lora_alpha=16,
                                    target_modules=targets)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
    # Each prompt on the base and on the adapter, interleaved in one batch.
    jobs = [(adapter, p) for p in prompts for adapter in (None, "fam")]
    expected = references(model_dir, adapter_dir, jobs)

    original = overrides.get("original_max_position_embeddings")  # longrope is exact up to there
    tokens, logprobs = greedy_with_logprobs(make_engine(model_dir, adapter_dir, max_model_len=original), jobs, NEW)

    assert tokens == [e[0] for e in expected]
    for got, (_, want) in zip(logprobs, expected):
        assert got == pytest.approx(want, abs=2e-4)
    # The adapter visibly changes the model, so its half of the batch checks the LoRA path.
    assert any(expected[i][0] != expected[i + 1][0] for i in range(0, len(jobs), 2))


@pytest.mark.parametrize("case", ["gemma2", "gemma3-text", "phi3-fused"])
def test_bf16_stays_close(case, tmp_path):
    """bf16 weights, KV cache and slots (the soft-capped and windowed paths too): the first token's
    logprob stays near transformers' fp32 one."""
    model_type, overrides, targets = CASES[case]
    model_dir = save_tiny_model(tmp_path / "model", model_type, seed=3, num_hidden_layers=2, **overrides)
    adapter_dir = make_peft_adapter(model_dir, tmp_path / "adapter", seed=4, std=0.2, r=8, lora_alpha=16,
                                    target_modules=targets)
    g = torch.Generator().manual_seed(6)
    jobs = [(adapter, torch.randint(2, 320, (n,), generator=g).tolist()) for n, adapter in ((30, None), (20, "fam"))]
    expected = references(model_dir, adapter_dir, jobs)
    _, logprobs = greedy_with_logprobs(make_engine(model_dir, adapter_dir, dtype="bfloat16"), jobs, NEW)
    for got, (_, want) in zip(logprobs, expected):
        assert got[0] == pytest.approx(want[0], abs=0.05)


def _config(model_type: str, **overrides) -> dict:
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    d = cfg.to_dict()
    d.update(overrides)
    return d


def _engine_refuses(tmp_path: Path, cfg: dict) -> str:
    """Start an engine on a directory holding `cfg` (no weights needed: the config is read first)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = Config()
    config.model.device = "cpu"
    with pytest.raises(UnsupportedModelError) as err:
        LLMEngine(config, tmp_path)
    return str(err.value)


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    cfg = _config("gpt2", architectures=["GPT2LMHeadModel"])
    message = _engine_refuses(tmp_path, cfg)
    assert "unsupported architecture ['GPT2LMHeadModel']" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert name in message


@pytest.mark.parametrize("model_type, overrides, why", [
    ("llama", dict(rope_parameters=dict(rope_type="proportional", rope_theta=10000.0)),
     "Llama 2/3/3.x, SmolLM checkpoint: unsupported rope scaling 'proportional'; supported: default, linear, "
     "llama3, yarn, dynamic, longrope"),
    ("llama", dict(hidden_act="relu"), "unsupported hidden_act 'relu'; supported: silu, gelu_pytorch_tanh"),
    ("llama", dict(mlp_bias=True), "unsupported option mlp_bias=true"),
    ("mistral", dict(attention_bias=True), "Mistral checkpoint: unsupported option attention_bias=true"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, layer_types=["chunked_attention"] * 2),
     "unsupported layer type 'chunked_attention'"),
    ("llama", dict(sliding_window=8), "unsupported option sliding_window=8"),
    ("llama", dict(final_logit_softcapping=30.0), "logit soft-capping is not part of this family"),
])
def test_unsupported_option_is_refused_by_name(tmp_path, model_type, overrides, why):
    assert why in _engine_refuses(tmp_path, _config(model_type, **overrides))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(max_position_embeddings=64, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                      factor=2.0))),
    ("phi3", dict(pad_token_id=0, max_position_embeddings=128, original_max_position_embeddings=64,
                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                                       long_factor=[2.0] * 8))),
])
def test_rope_scaling_past_the_pretrained_length_is_refused(tmp_path, model_type, overrides):
    """Past the original length transformers re-derives these RoPEs per batch: refused, with the way out."""
    model_dir = save_tiny_model(tmp_path / "m", model_type, num_hidden_layers=1, **overrides)
    config = Config()
    config.model.device = "cpu"
    config.model.max_model_len = 128
    with pytest.raises(UnsupportedModelError, match="RoPE scaling is served up to 64 positions only; max_model_len "
                                                    "128 is longer: pass --max-model-len 64"):
        LLMEngine(config, model_dir)


def test_legacy_gemma3_config_reads_as_transformers_converts_it():
    """Hub Gemma 3 configs predate nested rope_parameters: rope_theta + rope_scaling for the global
    layers, rope_local_base_freq for the sliding ones, sliding_window_pattern instead of layer_types."""
    import transformers

    legacy = dict(_config("gemma3_text", num_hidden_layers=7), rope_theta=1000000.0, rope_local_base_freq=10000.0,
                  rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6, sliding_window=16)
    for key in ("rope_parameters", "layer_types"):
        legacy.pop(key)
    hf = transformers.Gemma3TextConfig(**legacy)  # transformers' own conversion is the reference
    arch = ModelArch.from_hf_config(legacy)
    assert arch.layer_windows == tuple(16 if t == "sliding_attention" else None for t in hf.layer_types)
    for rope, kind in zip(arch.layer_ropes, hf.layer_types):
        want = hf.rope_parameters[kind]
        assert (rope.rope_type, rope.theta, rope.factor) == (want["rope_type"], want["rope_theta"],
                                                             want.get("factor", 1.0))


def test_every_registered_family_is_well_formed_and_has_a_parity_case():
    from server.model.families import FAMILIES, GROUP_COMPONENTS

    tested = {CASES[c][0] for c in CASES}
    for family in FAMILIES:
        assert set(family.linears) == set(GROUP_COMPONENTS), family.name
        for group, modules in family.linears.items():
            assert len(modules) in (1, len(GROUP_COMPONENTS[group])), (family.name, group)
        assert set(family.model_types) & tested, f"{family.name} has no case in CASES"


def test_registry_states_each_family_once():
    """The adapter-facing layout is derived from the one entry: fused names map to whole groups."""
    phi = ModelArch.from_hf_config(_config("phi3", architectures=["Phi3ForCausalLM"]))
    assert phi.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert phi.linear_shape("qkv_proj") == (64, 64 + 2 * 32) and phi.linear_shape("gate_up_proj") == (64, 224)
    llama = ModelArch.from_hf_config(_config("llama", architectures=["LlamaForCausalLM"]))
    assert llama.lora_groups["qkv"] == ("q_proj", "k_proj", "v_proj")
    assert llama.linear_shape("k_proj") == (64, 32)


def test_serve_any_family_and_models_shows_family_and_context(tmp_path):
    """`loramux serve --model DIR` (the README command) on a non-Llama family; /v1/models says which."""
    import httpx

    from server_process import ServerProcess

    model_dir = save_tiny_model(tmp_path / "gemma", "gemma2", num_hidden_layers=2, head_dim=16, sliding_window=8,
                                max_position_embeddings=256)
    srv = ServerProcess(["--model", str(model_dir), "--dtype", "float32", "--kv-cache-memory", "4MiB",
                         "--num-threads", "1", "--adapters-dir", ""], tmp_path / "server.log")
    try:
        cards = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"]
        assert [(c["family"], c["max_model_len"]) for c in cards] == [("gemma2", 256)]
        body = {"model": cards[0]["id"], "prompt": [5, 9, 33, 41, 7, 12, 90, 3, 3, 17], "max_tokens": 6,
                "temperature": 0}
        done = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60).json()
        assert done["usage"]["completion_tokens"] == 6, done
    finally:
        srv.stop()


@pytest.mark.parametrize("adapter_on, base", [("llama", "phi3"), ("phi3", "llama")])
def test_adapter_for_the_other_projection_layout_is_refused(tmp_path, adapter_on, base):
    """Same shapes, other layout: a q_proj adapter on a fused-qkv base (and back) names the projections
    this base serves instead of being packed into the wrong slices."""
    from server.adapters import AdapterError, inspect_peft_adapter

    source = save_tiny_model(tmp_path / "m", adapter_on, num_hidden_layers=1, pad_token_id=0)
    targets = ["qkv_proj", "down_proj"] if adapter_on == "phi3" else ["q_proj", "down_proj"]
    adapter = make_peft_adapter(source, tmp_path / "a", r=4, lora_alpha=4, target_modules=targets)
    arch = ModelArch.from_hf_config(_config(base, num_hidden_layers=1, pad_token_id=0))
    with pytest.raises(AdapterError) as err:
        inspect_peft_adapter(adapter, arch, name="x", max_rank=8)
    assert err.value.code == "adapter_unsupported"
    assert f"decoder projections {', '.join(arch.lora_targets)} is served" in str(err.value)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_tied_embeddings_by_the_family_default_when_config_omits_the_key(tmp_path, model_type):
    """Hub Gemma 2/3 configs leave out `tie_word_embeddings` (older transformers saved only values
    that differ from the defaults, and tied is the default for Gemma) and their checkpoints have no
    lm_head.weight: transformers ties them; the server refused them for a missing lm_head."""
    import transformers

    from engine_runs import cpu_engine

    model_dir = save_tiny_model(tmp_path / "m", model_type, seed=3, num_hidden_layers=1, head_dim=16,
                                tie_word_embeddings=True)
    cfg_file = model_dir / "config.json"
    cfg_file.write_text(json.dumps({k: v for k, v in json.loads(cfg_file.read_text()).items()
                                    if k != "tie_word_embeddings"}))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    prompt = torch.randint(2, 320, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = greedy(model, prompt, 6)
    tokens, logprobs = greedy_with_logprobs(cpu_engine(model_dir), [(None, prompt)], 6)
    assert tokens[0] == expected[0]
    assert logprobs[0] == pytest.approx(expected[1], abs=2e-4)


FAMILY_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_a_config_without_optional_keys_reads_as_transformers_defaults_it(model_type):
    """A config.json may leave out any key its family's config class has a default for (hand-written
    configs, or hub ones saved as a diff); transformers fills the class's defaults, which differ by
    family (Gemma: tied, soft-capped, head_dim 256, gelu; Gemma 3's global RoPE base 1e6; Phi-3's
    eps 1e-5): ours must read the same model, not a generic fallback."""
    import transformers

    from server.model.families import family_named

    minimal = dict(hidden_size=256, intermediate_size=112, num_hidden_layers=4, num_attention_heads=32, vocab_size=320)
    hf = transformers.AutoConfig.for_model(model_type, **minimal)
    arch = ModelArch.from_hf_config(dict(minimal, model_type=model_type))
    family = family_named(model_type)
    assert arch.tie_word_embeddings == hf.tie_word_embeddings
    assert arch.rms_norm_eps == hf.rms_norm_eps
    assert arch.max_position_embeddings == hf.max_position_embeddings
    assert arch.head_dim == (getattr(hf, "head_dim", None) or 8)
    assert arch.num_kv_heads == hf.num_key_value_heads
    assert arch.activation == getattr(hf, family.activation_key)
    assert arch.attn_softcap == getattr(hf, "attn_logit_softcapping", None)
    assert arch.final_softcap == getattr(hf, "final_logit_softcapping", None)
    assert arch.attn_scale == pytest.approx((getattr(hf, "query_pre_attn_scalar", None) or arch.head_dim) ** -0.5)
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * 4
    window = getattr(hf, "sliding_window", None)
    assert arch.layer_windows == tuple(window if t == "sliding_attention" else None for t in types)
    params = hf.rope_parameters
    assert [r.theta for r in arch.layer_ropes] == [params.get(t, params)["rope_theta"] for t in types]
