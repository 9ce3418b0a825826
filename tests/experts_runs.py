"""Our side of the issue-12 parity tests: an in-process `LLMEngine` over a known set of PEFT
adapters, run to completion on one batch of base / single-adapter / mixture / route requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, Mixture, Route, SamplingParams

Choice = str | Mixture | Route | None  # what a request runs with: base, one adapter, or experts


def experts_engine(model_dir: Path, adapters: dict[str, Path], kv_cache_memory: int = 16 << 20,
                   max_lora_rank: int = 16, lora_backend: str = "torch", **lora) -> LLMEngine:
    """fp32 CPU engine serving exactly `adapters` (no store); `lora`: other LoraConfig fields."""
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.cache.kv_cache_memory = kv_cache_memory
    cfg.lora.adapters_dir = None
    cfg.lora.lora_modules = {n: str(p) for n, p in adapters.items()}
    cfg.lora.max_lora_rank = max_lora_rank
    cfg.lora.lora_backend = lora_backend
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return LLMEngine(cfg, model_dir)


def _request(rid: str, prompt: list[int], new: int, choice: Choice) -> GenerationRequest:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0)
    if isinstance(choice, (Mixture, Route)):
        return GenerationRequest(rid, prompt, params, experts=choice)
    return GenerationRequest(rid, prompt, params, adapter=choice)


def run_batch(engine: LLMEngine, jobs: list[tuple[Choice, list[int]]], new: int, timeout: float = 120.0
              ) -> tuple[list[list[int]], list[list[float]], list[frozenset[str]]]:
    """Greedy `new` tokens for each (choice, prompt), all added before the first step; returns
    tokens, the sampled tokens' logprobs (in `jobs` order) and, per step that gave tokens, the
    requests it gave tokens to. Adapter loads run on a thread: bounded in time, not steps."""
    for i, (choice, prompt) in enumerate(jobs):
        engine.add_request(_request(f"r{i}", prompt, new, choice))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(jobs))}
    logprobs: dict[str, list[float]] = {f"r{i}": [] for i in range(len(jobs))}
    steps: list[frozenset[str]] = []
    deadline = time.monotonic() + timeout
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the batch did not finish in time"
        if engine.idle:
            time.sleep(0.01)
        outs = engine.step()
        for out in outs:
            assert out.error is None, (out.request_id, out.error)
            tokens[out.request_id].extend(out.token_ids)
            logprobs[out.request_id].extend(lp.logprob for lp in out.logprobs)
        if given := frozenset(o.request_id for o in outs if o.token_ids):
            steps.append(given)
    return list(tokens.values()), list(logprobs.values()), steps


def warm(engine: LLMEngine, names: list[str]) -> None:
    """Make every adapter resident in the host cache (parsed, prototypes and DoRA scales
    computed), so a later batch is admitted whole in its first step."""
    run_batch(engine, [(n, [2, 3]) for n in names], 1)


def to_json(choice: Choice) -> object:
    if isinstance(choice, Mixture):
        return {"mix": list(choice.adapters), "weights": list(choice.weights)}
    if isinstance(choice, Route):
        return {"route": list(choice.adapters), "top_k": choice.top_k, "temperature": choice.temperature}
    return choice


def from_json(value: object) -> Choice:
    if isinstance(value, dict) and "mix" in value:
        return Mixture(tuple(value["mix"]), tuple(value["weights"]))
    if isinstance(value, dict):
        return Route(tuple(value["route"]), value["top_k"], value["temperature"])
    return value


def run_triton_child(payload: dict, timeout: float = 600.0) -> dict:
    """Run `triton_child` on `payload` in a child under TRITON_INTERPRET (it must be set before
    triton is first imported, and must not leak into the caller's tests); its RESULT."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", "import experts_runs; experts_runs.triton_child()"],
                       input=json.dumps(payload), env=env, cwd=tests.parent, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def triton_child() -> None:
    """Entry of a child run under TRITON_INTERPRET: {model, adapters, jobs, new, lora (LoraConfig
    fields, optional)} as JSON on stdin; the batch's tokens, logprobs, LoRA backend, the pool's
    page rank and the request ids of each step as one `RESULT {json}` line on stdout."""
    case = json.load(sys.stdin)
    engine = experts_engine(Path(case["model"]), {n: Path(p) for n, p in case["adapters"].items()},
                            lora_backend="triton", **case.get("lora", {}))
    warm(engine, list(case["adapters"]))
    tokens, logprobs, steps = run_batch(engine, [(from_json(c), p) for c, p in case["jobs"]], case["new"])
    print("RESULT " + json.dumps({"tokens": tokens, "logprobs": logprobs, "lora": engine.runner.lora.name,
                                  "page_rank": engine.adapters.pool.page_rank, "steps": [sorted(s) for s in steps]}))
