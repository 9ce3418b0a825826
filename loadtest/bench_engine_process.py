"""HTTP server vs the engine in-process: does the server keep up with its own engine?

One run alternates three systems on the same workload (N concurrent generations of M tokens,
chat prompts, greedy, prefill included, base model or a cycle of store adapters):
  engine  - `LLMEngine` driven in this process, every request added at once (the ceiling);
  off     - `loramux serve --engine-process off`: the engine on a thread of the HTTP process;
  on      - `loramux serve --engine-process on`: the engine core in its own process (ZeroMQ).
Each HTTP round is N concurrent streaming chat completions through httpx. Throughput is output
tokens over the round's wall time; each round's ratio is taken against the engine round just
before it, and the medians are reported. Each HTTP round also reports the CPU seconds spent by
this client, the server process and the engine core process, as a fraction of the round's wall
time: on a machine of few cores the client and the server share them with the engine, which
the in-process round does not.

    python -m loadtest.bench_engine_process --streams 32 --max-tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from loadtest.procstat import cpu_s
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
             "List three uses of copper.", "Why is the sky blue?", "Give me a tip for learning to cook."]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]


def engine_round(engine: LLMEngine, n: int, new: int, adapters: list[str]) -> float:
    """On a thread, as both servers run their engine loop: from a main thread torch's CPU ops ran
    5-10x slower on the loaded 2-core machine (OpenMP), which would flatter both servers."""
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(_engine_round(engine, n, new, adapters)))
    worker.start()
    worker.join()
    return result[0]


def _engine_round(engine: LLMEngine, n: int, new: int, adapters: list[str]) -> float:
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(n):  # tokenizing is part of the work, as it is for the server
        ids = tok.encode(tok.render_chat(messages(i)), add_special_tokens=False)
        engine.add_request(GenerationRequest(f"e{time.monotonic_ns()}-{i}", ids, params,
                                             adapter=adapters[i % len(adapters)] if adapters else None))
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(o.token_ids) for o in engine.step())
    if produced != n * new:  # every request asked for `new` tokens with ignore_eos
        raise RuntimeError(f"{produced} tokens came back, not {n} x {new}")
    return produced / (time.perf_counter() - t0)


def step_stats(url: str) -> tuple[float, float]:
    """(engine steps, seconds spent in them) so far, from the server's /metrics."""
    count = total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loramux_step_seconds_count "):
            count = float(line.split()[1])
        elif line.startswith("loramux_step_seconds_sum "):
            total = float(line.split()[1])
    return count, total


async def http_round(url: str, model: str, n: int, new: int, adapters: list[str]) -> float:
    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": adapters[i % len(adapters)] if adapters else model, "messages": messages(i),
                "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens = 0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        return tokens

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(client, i) for i in range(n))))
        elapsed = time.perf_counter() - t0
    if produced != n * new:  # every request asked for `new` tokens with ignore_eos
        raise RuntimeError(f"{produced} tokens came back, not {n} x {new}")
    return produced / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--adapters", nargs="*", default=[], help="store adapters to cycle over (default: the base)")
    p.add_argument("--num-threads", type=int, help="torch threads of each engine (default: all cores)")
    args = p.parse_args()

    import sys
    sys.path.insert(0, str(REPO / "tests"))
    from server_process import ServerProcess  # the tests' server launcher: a real `loramux serve`

    common = ["--max-num-seqs", str(args.streams), "--log-level", "warning"]
    if args.num_threads:
        common += ["--num-threads", str(args.num_threads)]
    logs = Path("/tmp")
    servers = {mode: ServerProcess([*common, "--engine-process", mode], logs / f"bench-engine-process-{mode}.log",
                                   timeout=900) for mode in ("off", "on")}
    try:
        cfg = Config()
        cfg.scheduler.max_num_seqs = args.streams
        if args.num_threads:
            cfg.model.num_threads = args.num_threads
        engine = LLMEngine(cfg, _default_model())
        model = engine.info.model_name
        for srv in servers.values():  # warm-up: first requests build caches
            asyncio.run(http_round(srv.base_url, model, 2, 4, args.adapters))
        engine_round(engine, 2, 4, args.adapters)
        rows = []
        for r in range(args.rounds):
            row = {}
            for mode in ("off", "on"):
                row[f"engine/{mode}"] = engine_round(engine, args.streams, args.max_tokens, args.adapters)
                before = step_stats(servers[mode].base_url)
                pid = servers[mode].proc.pid
                cpu0 = (time.process_time(), cpu_s(pid, children=False), cpu_s(pid))
                t0 = time.perf_counter()
                row[mode] = asyncio.run(http_round(servers[mode].base_url, model, args.streams, args.max_tokens,
                                                   args.adapters))
                wall = time.perf_counter() - t0
                cpu1 = (time.process_time(), cpu_s(pid, children=False), cpu_s(pid))
                after = step_stats(servers[mode].base_url)
                client, server = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                row[f"cpu/{mode}"] = (client / wall, server / wall, (cpu1[2] - cpu0[2] - server) / wall)
                # How much of the round the engine spent inside steps, and the mean step.
                row[f"busy/{mode}"] = (after[1] - before[1]) / wall
                row[f"step/{mode}"] = (after[1] - before[1]) / max(1.0, after[0] - before[0])
            rows.append(row)
            print(f"round {r + 1}: engine {row['engine/off']:.1f} / {row['engine/on']:.1f} tok/s, "
                  f"off {row['off']:.1f} ({row['off'] / row['engine/off']:.2f}x), "
                  f"on {row['on']:.1f} ({row['on'] / row['engine/on']:.2f}x); in steps: off {row['busy/off']:.0%} "
                  f"(mean {row['step/off'] * 1e3:.0f} ms), on {row['busy/on']:.0%} (mean {row['step/on'] * 1e3:.0f} ms); "
                  f"CPU per wall second, client/server/core: off {'/'.join(f'{c:.2f}' for c in row['cpu/off'])}, "
                  f"on {'/'.join(f'{c:.2f}' for c in row['cpu/on'])}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if not k.startswith("cpu/")}
    ratio = {m: statistics.median(row[m] / row[f"engine/{m}"] for row in rows) for m in ("off", "on")}
    print(f"\n{args.streams} streams x {args.max_tokens} tokens, {args.rounds} rounds, "
          f"adapters: {', '.join(args.adapters) or 'none (base)'}")
    print("| system | tok/s (median) | vs engine in-process (median of per-round ratios) |")
    print("| --- | --- | --- |")
    print(f"| engine in-process | {statistics.median([*(r['engine/off'] for r in rows), *(r['engine/on'] for r in rows)]):.1f} | 1.00 |")
    print(f"| HTTP, `--engine-process off` (engine thread) | {med['off']:.1f} | {ratio['off']:.2f} |")
    print(f"| HTTP, `--engine-process on` (engine core process) | {med['on']:.1f} | {ratio['on']:.2f} |")


def _default_model() -> Path:
    from server.model.default_model import ensure_default_model

    return ensure_default_model()


if __name__ == "__main__":
    main()
