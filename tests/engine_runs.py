"""Drive an `LLMEngine` in-process to completion: the side of a parity test that is ours."""

from __future__ import annotations

import time
from pathlib import Path

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams


def cpu_engine(model_dir: Path, adapters: dict[str, Path] | None = None, *, kv_bytes: int = 8 << 20,
               max_num_seqs: int = 4, max_num_batched_tokens: int = 32, async_scheduling: bool = False,
               prefix_caching: bool = True, adapter_roots: tuple[Path, ...] = ()) -> LLMEngine:
    """A float32 CPU engine over `model_dir` serving `adapters` (name -> PEFT directory, max rank 8;
    None: --no-lora); prompts longer than `max_num_batched_tokens` are chunked; admin loads may
    read under `adapter_roots` (--allowed-adapter-roots)."""
    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.model.device = "cpu"
    cfg.cache.kv_cache_memory = kv_bytes
    cfg.cache.prefix_caching = prefix_caching
    cfg.scheduler.async_scheduling = async_scheduling
    cfg.scheduler.max_num_seqs = max_num_seqs
    cfg.scheduler.max_num_batched_tokens = max_num_batched_tokens
    cfg.lora.enabled = adapters is not None
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in (adapters or {}).items()}
    cfg.lora.max_lora_rank = 8
    cfg.lora.allowed_adapter_roots = [str(p) for p in adapter_roots]
    return LLMEngine(cfg, model_dir)


def greedy_with_logprobs(engine: LLMEngine, jobs: list[tuple[str | None, list[int]]],
                         new: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy `new` tokens for each (adapter or None, prompt ids), all submitted at once;
    returns the tokens and the sampled tokens' logprobs, in `jobs` order."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, (adapter, prompt) in enumerate(jobs):
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, adapter=adapter))
    return drain(engine, len(jobs))


def drain(engine: LLMEngine, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Step `engine` until it has no work; the tokens and sampled tokens' logprobs of requests
    r0 .. r{n-1} (each asked for logprobs=0)."""
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            logprobs.setdefault(out.request_id, []).extend(lp.logprob for lp in out.logprobs)
    return [tokens[f"r{i}"] for i in range(n)], [logprobs[f"r{i}"] for i in range(n)]


def warm(engine: LLMEngine, names, timeout: float = 120.0) -> None:
    """Load every adapter of `names` into the host cache before any request arrives, so the
    first steps can hold them all (otherwise the scheduler's prefetch window paces the loads)."""
    refs = [engine.adapters.lookup(None, n) for n in names]
    deadline = time.monotonic() + timeout
    while not all(engine.adapters.is_ready(r) for r in refs):
        assert time.monotonic() < deadline, "adapters did not load"
        engine.adapters.prefetch(refs, keep=set(refs))
        engine.adapters.poll(lambda: refs)
        time.sleep(0.01)
