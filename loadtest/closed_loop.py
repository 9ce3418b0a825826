"""A closed-loop request stream driven through one in-process `LLMEngine` by this thread.

`streams` requests are in flight; when one finishes the next is submitted, until the list is done
(or a deadline passes). No HTTP and no event loop: the engine's own cost, per request TTFT (submit
to first token) and TPOT ((last - first token) / (tokens - 1)), and a check that every request
returned the tokens it asked for (`ignore_eos`). Used by the many-adapters ceiling
(loadtest/many_adapters_ceiling.py) and its GPU check (loadtest/gpu_many_adapters.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from loadtest.report import percentile
from loadtest.workload import RequestSpec


@dataclass(frozen=True)
class Job:
    """One request of the stream: its spec (adapter, max_tokens) and its prompt's token ids."""

    spec: RequestSpec
    prompt_ids: list[int]


def run(engine, jobs: list[Job], streams: int, tag: str, deadline: float | None = None) -> dict:
    """Drive `jobs` in order, `streams` at a time, through `engine`; a request that ends in an error
    raises RuntimeError. At `deadline` (a time.monotonic() value) the requests in flight are aborted
    and the row says so (`complete` False). `tokens_ok`: every finished request returned its
    max_tokens (`short_requests` did not). Times in seconds."""
    from server.engine.request import GenerationRequest, SamplingParams

    todo = list(reversed(jobs))
    want: dict[str, int] = {}
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    wake = threading.Event()
    engine.wake = wake.set
    t0 = time.perf_counter()

    def submit():
        job = todo.pop()
        rid = f"{tag}-{job.spec.index}"
        params = SamplingParams(max_tokens=job.spec.max_tokens, temperature=0.0, ignore_eos=True)
        want[rid] = job.spec.max_tokens
        start[rid] = time.perf_counter()
        engine.add_request(GenerationRequest(rid, job.prompt_ids, params, adapter=job.spec.adapter))

    while todo and len(start) < streams:
        submit()
    steps, idle_s, cut = 0, 0.0, False
    try:
        while engine.has_unfinished():
            if deadline is not None and time.monotonic() > deadline:
                cut = True
                for rid in set(start) - set(done):
                    engine.abort(rid)
                break
            outs = engine.step()
            steps += 1
            now = time.perf_counter()
            for out in outs:
                if out.token_ids and out.request_id not in first:
                    first[out.request_id] = now
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"{out.request_id}: {out.error}")
                    done[out.request_id] = (now, out.num_output_tokens)
                    if todo:
                        submit()
            if engine.idle:  # everything waits on adapter loads: sleep until the loader wakes us, as the server does
                t = time.perf_counter()
                wake.wait(0.05)
                wake.clear()
                idle_s += time.perf_counter() - t
    finally:
        engine.wake = None
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in done.values())
    ttft = [first[r] - start[r] for r in done if r in first]
    tpot = [(done[r][0] - first[r]) / (done[r][1] - 1) for r in done if r in first and done[r][1] > 1]
    short = sum(1 for r, (_, n) in done.items() if n != want[r])
    return {"requests": len(done), "submitted": len(start), "of": len(jobs), "complete": not cut and not todo,
            "tokens": tokens, "short_requests": short, "tokens_ok": short == 0,
            "wall_s": wall, "output_tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99),
            "steps": steps, "idle_s": idle_s, "distinct_used": len({j.spec.adapter for j in jobs})}


def step_to_end(engine, requests: int, tokens: int) -> None:
    """Step `engine` until it has nothing left to do. Each of the `requests` requests it holds must
    finish without an error after exactly `tokens` tokens (they ask for them with `ignore_eos`),
    else RuntimeError: a benchmark that divides by tokens that never came would overstate its
    throughput."""
    got: dict[str, int] = {}
    errors: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] = got.get(out.request_id, 0) + len(out.token_ids)
            if out.finished and out.error:
                errors.append(f"{out.request_id}: {out.error}")
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    short = sorted(n for n in got.values() if n != tokens)
    if len(got) != requests or short:
        raise RuntimeError(f"{len(got)} of {requests} requests returned tokens; returned other than {tokens} "
                           f"tokens: {len(short)} (e.g. {short[:3]})")
