"""The asyncio bridge: admission answers before any output, so a request the engine refuses
at admission (its adapter unloaded after the HTTP side validated it) is still an HTTP status."""

from __future__ import annotations

import asyncio

import pytest

from peft_adapters import make_peft_adapter
from server.config import Config
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory) -> LLMEngine:
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "racer", r=4, lora_alpha=4,
                                target_modules=["q_proj", "v_proj"])
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
    cfg.lora.adapters_dir, cfg.lora.lora_modules = None, {"racer": str(adapter)}
    return LLMEngine(cfg, tiny_llama_dir)


def test_an_adapter_unloaded_between_validation_and_admission_is_model_not_found(engine):
    async def main():
        bridge = AsyncEngine(engine, max_pending=8)
        bridge.start()
        try:
            request = GenerationRequest("r1", [5, 6, 7], SamplingParams(max_tokens=2), adapter="racer")
            bridge.validate(request)  # the HTTP side's check passes ...
            await bridge.call(lambda e: e.adapters.unregister(None, "racer"))  # ... then an unload wins the race
            with pytest.raises(InvalidRequestError) as refused:
                await bridge.submit(request)
            base = await bridge.submit(GenerationRequest("r2", [5, 6, 7], SamplingParams(max_tokens=3)))
            outputs = [out async for out in base]
            return refused.value, outputs, bridge.num_pending
        finally:
            bridge.shutdown()

    refused, outputs, pending = asyncio.run(main())
    assert refused.code == "model_not_found" and refused.param == "model"
    assert sum(len(o.token_ids) for o in outputs) == 3 and outputs[-1].finished
    assert pending == 0


def test_closing_a_stream_early_aborts_its_request_and_frees_its_blocks(engine):
    async def main():
        bridge = AsyncEngine(engine, max_pending=8)
        bridge.start()
        try:
            stream = await bridge.submit(GenerationRequest("r3", [5, 6, 7], SamplingParams(max_tokens=400,
                                                                                            ignore_eos=True)))
            await stream.__anext__()
            await stream.aclose()
            return bridge.num_pending, await bridge.call(lambda e: (e.num_unfinished, e.allocator.num_used))
        finally:
            bridge.shutdown()

    assert asyncio.run(main()) == (0, (0, 0))
