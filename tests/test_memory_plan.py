"""The KV cache's size (server/engine/memory_plan.py): the plan's arithmetic on plain numbers, the
--kv-cache-memory / 2 GiB path, the max_model_len cap, and the profile step's dummy batch, whose
logits must be the model's (transformers') for that prompt: a layout bug would read other K/V.
Fast, CPU only (the device measurement itself runs in tests/test_gpu_engine.py on a GPU)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from server.config import Config, GiB
from server.engine.backends import select_attention
from server.engine.memory_plan import DeviceMemory, cap_model_len, fixed_blocks, plan_blocks, profile_prefill
from server.engine.sampler import _top_p
from server.model.arch import ModelArch
from server.model.decoder import DecoderModel
from server.model.loading import load_weights

BLOCK = 2 << 20  # bytes per KV block


def memory(**kw) -> DeviceMemory:
    """An 80 GiB device: 20 GiB held by the engine, 5 GiB activations, 1 GiB graphs, 60 GiB free."""
    m = dict(total=80 * GiB, free=60 * GiB, used=20 * GiB, activation_peak=5 * GiB, graph_reserve=1 * GiB,
             block_bytes=BLOCK, utilization=0.9)
    return DeviceMemory(**{**m, **kw})


def test_the_cache_gets_the_share_left_after_weights_activations_and_graphs():
    plan = plan_blocks(memory())
    share = int(80 * GiB * 0.9) - 20 * GiB - 5 * GiB - 1 * GiB  # 46 GiB
    assert plan.num_blocks == share // BLOCK and plan.budget == share and not plan.limited_by_free
    assert plan_blocks(memory(utilization=0.5)).num_blocks == (40 * GiB - 26 * GiB) // BLOCK
    assert plan_blocks(memory(utilization=1.0)).num_blocks == (54 * GiB) // BLOCK  # == the free room


def test_memory_other_processes_hold_is_not_taken():
    """Another process holds 30 GiB: 30 GiB free, of which the step and the graphs need 6."""
    plan = plan_blocks(memory(free=30 * GiB))
    assert plan.limited_by_free and plan.num_blocks == 24 * GiB // BLOCK


@pytest.mark.parametrize("kw", [dict(used=70 * GiB), dict(free=6 * GiB), dict(utilization=0.3),
                                dict(activation_peak=51 * GiB - BLOCK + 1)])
def test_no_room_for_one_block_is_an_error_naming_the_flags(kw):
    with pytest.raises(ValueError, match="no device memory left for the KV cache") as err:
        plan_blocks(memory(**kw))
    assert "--gpu-memory-utilization" in str(err.value) and "--kv-cache-memory" in str(err.value)


def test_one_block_is_enough():
    assert plan_blocks(memory(activation_peak=51 * GiB - BLOCK)).num_blocks == 1


@pytest.mark.parametrize("utilization", [0.0, -0.5, 1.01, math.nan])
def test_a_fraction_outside_0_1_is_refused(utilization):
    with pytest.raises(ValueError, match="--gpu-memory-utilization must be in"):
        plan_blocks(memory(utilization=utilization))


def test_kv_cache_memory_wins_on_every_device_and_cpu_keeps_2_gib():
    cfg = Config()
    assert cfg.cache.kv_cache_memory is None
    assert fixed_blocks(cfg, torch.device("cpu"), BLOCK, 4096) == (2 * GiB // BLOCK, 4096)
    # on CUDA without the flag the plan decides, after loading (nothing asks the device here)
    assert fixed_blocks(cfg, torch.device("cuda"), BLOCK, 4096) == (None, 4096)
    cfg.cache.kv_cache_memory = 64 * BLOCK
    for device in ("cpu", "cuda"):
        assert fixed_blocks(cfg, torch.device(device), BLOCK, 512) == (64, 512)


def test_a_small_cache_lowers_max_model_len_and_a_tiny_one_is_refused_by_its_flag(caplog):
    cfg = Config()
    cfg.cache.kv_cache_memory = 10 * 1000  # 10 blocks of 16 tokens at 1000 bytes a block
    with caplog.at_level(logging.WARNING, logger="server.engine.memory_plan"):
        assert fixed_blocks(cfg, torch.device("cpu"), 1000, 4096) == (10, 160)
    assert "capping max_model_len from 4096" in caplog.text
    cfg.cache.kv_cache_memory = 999
    with pytest.raises(ValueError, match=r"--kv-cache-memory 999 bytes holds 0 tokens of KV cache: too small"):
        fixed_blocks(cfg, torch.device("cpu"), 1000, 4096)
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.9 holds 0 tokens"):
        cap_model_len(cfg, 0, 4096, "--gpu-memory-utilization 0.9")


def test_the_profile_steps_dummy_prompts_get_the_models_logits(tiny_llama_dir):
    """Token ids 0..39 in rows of at most 16 (16, 16, 8; blocks of 4): each row's last logits are
    those transformers gives that row's prompt alone, top-p masked as the sampler masks them."""
    import transformers

    arch = ModelArch.from_dir(tiny_llama_dir)
    cpu = torch.device("cpu")
    model = DecoderModel(arch, load_weights(tiny_llama_dir, arch, torch.float32, cpu), max_positions=16)
    attention = select_attention("torch", arch, cpu, torch.float32)
    got = profile_prefill(model, attention, 40, max_seqs=40, max_len=16, block_size=4)
    assert got.shape == (40, arch.vocab_size)
    assert profile_prefill(model, attention, 40, max_seqs=3, max_len=16, block_size=4).shape == (3, arch.vocab_size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for start, end in ((0, 16), (16, 32), (32, 40)):
            ref = hf(torch.arange(start, end)[None]).logits[0, -1:]
            torch.testing.assert_close(got[end - 1:end], _top_p(ref, [0.9]), atol=1e-4, rtol=1e-4)
