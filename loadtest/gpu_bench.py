"""The pieces of gpu_check.py's decode benchmark: a random-weight model, random adapters, and
decode throughput of this engine, transformers `generate` and PEFT mixed-adapter `generate`
over the same weights, against the HBM floor.

Decode throughput is measured alike for every system (as loadtest/bench_engine.py):
    B * (N - 1) / (time to generate N tokens - time to generate 1 token)
so prompt processing is excluded; every run must return exactly the requested tokens.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

import server.engine.engine as engine_module
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams
from server.model.arch import ModelArch
from server.model.families import BLOCK_OF
from server.model.loading import ModelWeights

# Llama-3.1-8B's config.json, less what only the tokenizer needs.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
TINY = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
LORA_RANK = 16


def write_model_dir(path: Path, hf_config: dict) -> Path:
    """config.json + a word-level tokenizer covering the whole vocabulary: what the engine reads
    besides the weights (random token ids must detokenize)."""
    import transformers
    from tokenizers import Tokenizer, models

    path.mkdir(parents=True, exist_ok=True)
    transformers.LlamaConfig(**hf_config).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(hf_config["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path / "tokenizer.json"))
    eos = f"t{hf_config['eos_token_id']}"
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": f"t{hf_config['bos_token_id']}",
                                                            "eos_token": eos}))
    return path


def lora_params(arch: ModelArch, rank: int = LORA_RANK) -> int:
    """Parameters of one adapter of `rank` on all seven projections of every layer."""
    return arch.num_layers * sum(rank * sum(arch.linear_shape(m)) for m in arch.lora_targets)


def write_adapters(root: Path, arch: ModelArch, count: int, dtype: torch.dtype, device: torch.device,
                   rank: int = LORA_RANK, seed: int = 0) -> dict[str, Path]:
    """`count` PEFT LoRA directories (rank `rank`, all linear projections), tensors drawn on
    `device` (fast) and written directly with safetensors: PEFT's own save would first build an
    8B transformers model."""
    import peft
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)
    out = {}
    for n in range(count):
        d = root / f"lora{n:02d}"
        d.mkdir(parents=True, exist_ok=True)
        peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(arch.lora_targets), lora_dropout=0.0,
                        task_type="CAUSAL_LM").save_pretrained(str(d))
        tensors = {}
        for layer in range(arch.num_layers):
            for m in arch.lora_targets:
                n_in, n_out = arch.linear_shape(m)
                key = f"base_model.model.model.layers.{layer}.{BLOCK_OF[m]}.{m}"
                tensors[f"{key}.lora_A.weight"] = (randn(rank, n_in) / n_in ** 0.5).to(dtype).cpu()
                tensors[f"{key}.lora_B.weight"] = (randn(n_out, rank) * 0.01).to(dtype).cpu()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        out[d.name] = d
    return out


@contextmanager
def engine_weights(weights: ModelWeights):
    """LLMEngine(...) inside this block takes `weights` instead of reading a checkpoint. The one
    touch point: server/engine/engine.py calls `load_weights` by that module-level name."""
    with mock.patch.object(engine_module, "load_weights", lambda *args, **kwargs: weights):
        yield


def make_engine(model_dir: Path, weights: ModelWeights, *, lora: bool, adapters: dict[str, Path],
                max_seqs: int, max_len: int, device: str, dtype: str, enforce_eager: bool = False,
                graph_sizes: tuple[int, ...] | None = None) -> LLMEngine:
    """`graph_sizes`: the decode batch sizes to capture (--cuda-graph-sizes; None: the ladder)."""
    cfg = Config()
    cfg.model.device, cfg.model.dtype, cfg.model.max_model_len = device, dtype, max_len
    cfg.model.enforce_eager = enforce_eager  # off: decode steps replay CUDA graphs (on CUDA)
    cfg.model.cuda_graph_sizes = graph_sizes
    cfg.scheduler.max_num_seqs = max_seqs
    cfg.scheduler.max_num_batched_tokens = max(2048, max_len)
    cfg.lora.enabled = lora
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapters.items()}
    cfg.lora.lora_pool_memory = 16 << 30  # every adapter of the run resident (64 x ~84 MB at rank 16)
    cfg.lora.max_cpu_loras = max(1, len(adapters))
    cfg.lora.max_lora_rank = LORA_RANK
    cfg.lora.cpu_lora_cache_memory = 1 << 40  # every adapter stays parsed: loads are setup, not decode
    arch = ModelArch.from_dir(model_dir)
    per_token = 2 * arch.num_layers * arch.kv_size * weights.embed.element_size()
    cfg.cache.kv_cache_memory = per_token * (max_seqs + 2) * (max_len + cfg.cache.block_size)
    with engine_weights(weights):
        return LLMEngine(cfg, model_dir)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n, length), generator=g).tolist()


class TokenCountError(AssertionError):
    """A run returned other than the requested number of tokens."""


def engine_time(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
                async_scheduling: bool = False) -> float:
    """Seconds for `engine` to give every prompt `new_tokens` greedy tokens (one adapter or None per
    prompt), scheduling synchronously or asynchronously (--async-scheduling) for this run."""
    engine.async_scheduling = async_scheduling
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [f"g{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p, a in zip(ids, prompts, adapters):
        engine.add_request(GenerationRequest(rid, p, params, adapter=a))
    got = dict.fromkeys(ids, 0)
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                raise TokenCountError(f"request {o.request_id} failed: {o.error}")
            got[o.request_id] += len(o.token_ids)
        if engine.idle:  # every request waits on an adapter load: leave the loader thread the GIL
            time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    wrong = {rid: n for rid, n in got.items() if n != new_tokens}
    if wrong:
        raise TokenCountError(f"engine: {len(wrong)} of {len(ids)} requests returned other than {new_tokens} "
                              f"tokens, e.g. {next(iter(wrong.values()))}")
    return elapsed


def hf_time(model, prompts: list[list[int]], new_tokens: int, adapter_names: list[str] | None = None) -> float:
    """transformers (or PEFT, with one adapter name per row) greedy `generate`, equal-length prompts."""
    ids = torch.tensor(prompts, device=model.device)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             **extra)
    sync()
    elapsed = time.perf_counter() - t0
    if tuple(out.shape) != (len(prompts), len(prompts[0]) + new_tokens):
        raise TokenCountError(f"generate returned shape {tuple(out.shape)} for {len(prompts)} prompts of "
                              f"{len(prompts[0])} tokens + {new_tokens} new")
    return elapsed


def decode_tps(run: Callable[[int], float], streams: int, new_tokens: int, repeats: int) -> float:
    """Median over `repeats` of B * (N - 1) / (t(N) - t(1)); t(1) is the faster of two runs (a
    stall can only add time, and one in t(1) would inflate the rate)."""
    rates = []
    for _ in range(repeats):
        for attempt in range(3):  # a stall in both 1-token runs (a loaded host) can hide the decode: measure again
            first = run(1)  # first: a kernel compiled on first use is not counted in the decode
            decode = run(new_tokens) - min(first, run(1))
            if decode > 0:
                break
        else:
            raise RuntimeError(f"timing noise: {new_tokens} tokens took no longer than 1 token, 3 times")
        rates.append(streams * (new_tokens - 1) / decode)
    return statistics.median(rates)


def hf_model_over(weights: ModelWeights, hf_config: dict):
    """A transformers LlamaForCausalLM whose parameters are views of the engine's `weights`
    (fused q/k/v and gate/up rows sliced back apart): the same numbers, no second copy."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(**hf_config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)

    def put(module: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))

    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    for layer, w in zip(model.model.layers, weights.layers):
        att, mlp = layer.self_attn, layer.mlp
        put(layer.input_layernorm, "weight", w.attn_in_norm)
        put(layer.post_attention_layernorm, "weight", w.mlp_in_norm)
        put(att.q_proj, "weight", w.qkv[:q])
        put(att.k_proj, "weight", w.qkv[q:q + kv])
        put(att.v_proj, "weight", w.qkv[q + kv:])
        put(att.o_proj, "weight", w.o)
        put(mlp.gate_proj, "weight", w.gate_up[:inter])
        put(mlp.up_proj, "weight", w.gate_up[inter:])
        put(mlp.down_proj, "weight", w.down)
    put(model.model.embed_tokens, "weight", weights.embed)
    put(model.model.norm, "weight", weights.norm)
    put(model.lm_head, "weight", weights.lm_head)
    with torch.device(weights.embed.device):  # its constructor's signature varies between versions
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' Llama has tensors the engine's weights do not cover: {left[:4]}")
    model.generation_config.eos_token_id = None
    return model.eval()


def load_peft(model, adapters: dict[str, Path], into=None):
    """Wrap `model` in PEFT with `adapters` (or add them to the PeftModel `into`), kept in the
    model dtype (PEFT would upcast them to fp32 otherwise, a slower baseline than it need be)."""
    import peft

    for name, path in adapters.items():
        if into is None:
            into = peft.PeftModel.from_pretrained(model, str(path), adapter_name=name,
                                                  autocast_adapter_dtype=False, low_cpu_mem_usage=True)
        else:
            into.load_adapter(str(path), adapter_name=name, autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    return into.eval()


# --- the floor ---------------------------------------------------------------------------------------


def release_cached_memory() -> None:
    """torch.cuda.empty_cache(), in cleanup paths: after a CUDA error (a sticky one poisons the
    context) it raises that error again, which must not mask the first or stop the run."""
    try:
        torch.cuda.empty_cache()
    except RuntimeError as exc:
        print(f"(empty_cache after a CUDA error: {str(exc)[:200]})", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read + written (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


@dataclass(frozen=True)
class StepBytes:
    weights: int
    adapters: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.kv


def step_bytes(arch: ModelArch, streams: int, context: float, distinct_adapters: int, elem: int) -> StepBytes:
    """Bytes one decode step of `streams` sequences must read at least once: every weight matrix
    (embedding rows aside), each distinct adapter's A and B, and the K/V of `context` positions
    per sequence over all layers."""
    kv = int(streams * context * arch.num_layers * 2 * arch.kv_size * elem)
    return StepBytes(arch.weight_params() * elem, distinct_adapters * lora_params(arch) * elem, kv)
