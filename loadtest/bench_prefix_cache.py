"""Prefix caching: requests that share a long system prompt, with the prefix cache and without.

The default model in-process (as the engine core runs it), two engines built alike but for
`--no-prefix-caching`. Each round submits `--requests` chat requests at once, every one the same
system prompt of about `--system-tokens` tokens followed by its own short question, greedy,
`--max-tokens` tokens each (checked). The engines alternate rounds; each first runs one untimed
round, so the cache holds the system prompt as it would on a server that has been serving it.
Reported per system, medians over rounds: TTFT p50 (submission to first token), the round's wall
time, output tok/s, and the prompt tokens computed per request (the rest came from the cache);
then the ratios, and how many requests got the same tokens from both (all of them in float32,
which is checked; in bf16 a different split of the prompt's computation may flip a near tie).

With `--cold` every round starts from an empty cache (the burst brings a system prompt the
server has not seen), and a third engine runs beside the two: the cache without same-step
sharing (`Scheduler._shares_this_step` never deferring: each sequence admitted in the burst's
first step computes the system prompt itself, as before that rule).

    python -m loadtest.bench_prefix_cache --system-tokens 512 --requests 16 --max-tokens 16 --rounds 3
    python -m loadtest.bench_prefix_cache --system-tokens 512 --requests 16 --max-tokens 16 --rounds 3 --cold
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import torch

from loadtest.bench_engine_process import QUESTIONS, _default_model
from loadtest.bench_step_overhead import cpu_name
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams

PARAGRAPH = ("You are the support assistant of a company that sells garden tools. Answer briefly and "
             "politely, name the product when you can, never invent prices, and say when you do not know. ")


def make_engine(prefix_caching: bool, requests: int, dtype: str, same_step: bool = True) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype = dtype
    cfg.cache.prefix_caching = prefix_caching
    cfg.scheduler.max_num_seqs = max(cfg.scheduler.max_num_seqs, requests)
    cfg.lora.enabled = False
    engine = LLMEngine(cfg, _default_model(), detokenize=False)
    if not same_step:  # the peer: the scheduler before same-step sharing
        engine.scheduler._shares_this_step = lambda seq, prefix: False
    return engine


def prompts(engine: LLMEngine, system_tokens: int, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    words = max(1, system_tokens // len(tok.encode(PARAGRAPH, add_special_tokens=False)))
    system = PARAGRAPH * words
    return [tok.encode(tok.render_chat([{"role": "system", "content": system},
                                        {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]),
                       add_special_tokens=False) for i in range(n)]


def round_(engine: LLMEngine, ps: list[list[int]], new: int, cold: bool = False) -> dict:
    """One round on a worker thread (as the engine core steps; see bench_engine_process);
    `cold`: from an empty prefix cache."""
    if cold:
        engine.allocator.forget_cached()
    out: list[dict] = []
    worker = threading.Thread(target=lambda: out.append(_round(engine, ps, new)))
    worker.start()
    worker.join()
    return out[0]


def _round(engine: LLMEngine, ps: list[list[int]], new: int) -> dict:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    labels = {"model_name": engine.info.model_name, "engine": "0"}

    def hits() -> float:
        return engine.metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", labels)
    hits_before = hits()
    t0 = time.perf_counter()
    ids = [f"p{time.monotonic_ns()}-{i}" for i in range(len(ps))]
    for rid, p in zip(ids, ps):
        engine.add_request(GenerationRequest(rid, p, params))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    ttft: dict[str, float] = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            if o.token_ids and o.request_id not in ttft:
                ttft[o.request_id] = time.perf_counter() - t0
            tokens[o.request_id] += o.token_ids
    wall = time.perf_counter() - t0
    short = [rid for rid, t in tokens.items() if len(t) != new]
    if short:
        raise AssertionError(f"{len(short)} requests returned other than {new} tokens")
    computed = sum(map(len, ps)) - (hits() - hits_before)
    return dict(ttft=statistics.median(ttft.values()), wall=wall, tok_s=len(ps) * new / wall,
                computed=computed / len(ps), tokens=[tokens[rid] for rid in ids])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="the engines' --dtype (float32: the tokens must be equal)")
    ap.add_argument("--cold", action="store_true", help="every round from an empty cache, beside the cache "
                    "without same-step sharing")
    args = ap.parse_args(argv)

    systems = [("cache", True, True), ("no cache", False, True)]
    if args.cold:
        systems.insert(1, ("cache, no same-step sharing", True, False))
    engines = {name: make_engine(on, args.requests, args.dtype, same_step) for name, on, same_step in systems}
    ps = prompts(engines["cache"], args.system_tokens, args.requests)
    print(f"{cpu_name()}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{engines['cache'].info.dtype}; prompts {min(map(len, ps))}-{max(map(len, ps))} tokens")
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for name, engine in engines.items():
        round_(engine, ps, args.max_tokens)  # untimed: kernels warm, the cache holds the system prompt
    for _ in range(args.rounds):
        for name, engine in engines.items():
            results[name].append(round_(engine, ps, args.max_tokens, args.cold))
    # fp32: the same tokens. bf16: computing a prompt's suffix alone rounds differently from
    # computing it with its prefix (as any change of chunking does), and a near tie can flip.
    same = [a == b for a, b in zip(results["cache"][0]["tokens"], results["no cache"][0]["tokens"])]
    if engines["cache"].info.dtype == torch.float32 and not (
            all(same) and all(r[0]["tokens"] == results["cache"][0]["tokens"] for r in results.values())):
        raise AssertionError("the prefix cache changed the tokens")

    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("ttft", "wall", "tok_s", "computed")}
           for name, rs in results.items()}
    print("| system | TTFT p50 s | round s | output tok/s | prompt tokens computed per request |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in med.items():
        print(f"| {name} | {m['ttft']:.3f} | {m['wall']:.2f} | {m['tok_s']:.1f} | {m['computed']:.0f} |")
    c = med["cache"]
    for peer in list(med)[1:]:
        p = med[peer]
        print(f"cache / {peer}: TTFT {c['ttft'] / p['ttft']:.2f}x, throughput {c['tok_s'] / p['tok_s']:.2f}x "
              f"(medians of {args.rounds} rounds)")
    print(f"{sum(same)} of {len(same)} requests with the same tokens with the cache and without")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
