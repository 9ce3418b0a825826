"""Issue 11's many-adapters scenario on a GPU: the engine in-process over random Llama-3.1-8B-shaped
bf16 weights made on the device, 1,000 registered rank-16 q/v adapters, Zipf(1.0) popularity, 32
closed-loop streams of 64 output tokens, default engine flags (but CUDA graphs captured only up to 32
rows, the most a step holds); and the issue's baseline, the same against 8 adapters used
uniformly, in the same run.

Per cell: output tok/s, TTFT and TPOT p50/p99 (loadtest/closed_loop.py), host-cache hit rate and
loads/s (the engine's Metrics counters over the timed window), distinct adapters per step (mean /
max), and every request checked to return its tokens; then the ratios 1,000 vs 8 against the
issue's targets (throughput >= 0.8x, TTFT p50 <= 2x). Each cell gets a fresh engine (a fresh
server, as loadtest/many_adapters.py) over the same weights, warmed up by a few requests on an
adapter no cell uses (so N + 1 are registered). The store: N names hard-linked to a few distinct
random adapter files (loadtest/random_adapters.py; the issue's CPU scenario's q/v adapters, 13.6 MB
each at 8B); the default host cache holds 64 of them, the default 2 GiB pool 23 (87.6 MiB a slot).

The whole run has a deadline (75 s on an H200, weights included): a cell is not started with less
than `min_cell_s` left, and one still running at the deadline is cut (its requests in flight
aborted); the rows say which.

    python -m loadtest.gpu_many_adapters --out DIR           # CUDA; --out defaults to $OUT, else ./gpu_check_out
    python -m loadtest.gpu_many_adapters --smoke --out DIR   # CPU, tiny model: the same code path

Writes DIR/gpu_many_adapters.md and DIR/gpu_many_adapters.json; exit 1 if a request returned other
than its tokens. gpu_check.py runs `run` as one section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loadtest import closed_loop, workload  # noqa: E402
from loadtest import gpu_bench as gb  # noqa: E402
from loadtest import random_adapters as ra  # noqa: E402
from loadtest.gpu_systems import STARTED  # noqa: E402

WARM_UP = "warm-up"  # an adapter no cell uses, for the warm-up requests (Triton compiles, first allocations)


@dataclass(frozen=True)
class Cell:
    adapters: int  # registered, and the Zipf draws' support
    zipf: float  # 0: uniform


@dataclass(frozen=True)
class Plan:
    hf_config: dict
    device: str
    dtype: str  # the engine's --dtype
    cells: tuple[Cell, ...]  # the first is the baseline the others are compared with
    streams: int  # closed-loop requests in flight
    requests: int  # per cell
    prompt_len: int  # random prompt token ids per request
    new_tokens: int  # per request, EOS ignored
    rank: int
    distinct_files: int  # adapters with their own random weights; the other names hard-link them
    budget_s: float  # the CLI's deadline; gpu_check passes its section's
    min_cell_s: float  # a cell is not started with less than this left (one started is cut at the deadline)
    lora_flags: dict = field(default_factory=dict)  # engine LoRA settings; {} = the server's defaults
    kv_cache_memory: int | None = None  # None: the server's default (on CUDA: --gpu-memory-utilization)
    num_threads: int | None = None  # torch threads on CPU; None: the default


# 2 GiB of KV cache, as in earlier runs (an engine per cell: not 0.9 of the GPU for each).
GPU = Plan(hf_config=gb.LLAMA_8B, device="cuda", dtype="bfloat16", cells=(Cell(8, 0.0), Cell(1000, 1.0)),
           streams=32, requests=64, prompt_len=32, new_tokens=64, rank=16, distinct_files=16, budget_s=75,
           min_cell_s=10, kv_cache_memory=2 << 30)
# The host cache smaller than the set (as on the GPU: 64 of 1,000), so loads and misses happen here too.
SMOKE = Plan(hf_config=gb.TINY, device="cpu", dtype="float32", cells=(Cell(2, 0.0), Cell(24, 1.0)), streams=4,
             requests=16, prompt_len=8, new_tokens=8, rank=16, distinct_files=4, budget_s=60, min_cell_s=0,
             lora_flags={"max_cpu_loras": 6}, kv_cache_memory=16 << 20, num_threads=1)
TARGETS = (  # (name, row key, goal, True if higher is better): the issue's, many cell / baseline cell
    ("throughput", "output_tok_s", 0.8, True),
    ("TTFT p50", "ttft_p50_s", 2.0, False),
)


class StepAdapters:
    """Stands in for `Metrics.step_adapters` (a histogram: no max): forwards each observation and
    keeps it, so a cell reads the mean and max of distinct adapters per step."""

    def __init__(self, histogram):
        self.histogram = histogram
        self.values: list[int] = []

    def observe(self, value: float) -> None:
        self.histogram.observe(value)
        self.values.append(int(value))


def counter_total(counter) -> float:
    """A prometheus Counter's value, summed over its labels."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def adapter_counters(metrics) -> dict[str, float]:
    return {"hits": counter_total(metrics.adapter_cache_hits), "misses": counter_total(metrics.adapter_cache_misses),
            "loads": counter_total(metrics.adapter_loads), "slot_writes": counter_total(metrics.adapter_slot_writes),
            "evictions": counter_total(metrics.adapter_evictions)}  # host and device tiers


def make_stores(plan: Plan, model_dir: Path, work: Path) -> dict[int, Path]:
    """One store per cell: the first N names of one set (random files for the first
    `distinct_files`, hard links for the rest), plus the warm-up adapter. -> N -> store."""
    big = max(c.adapters for c in plan.cells)
    pool = work / "adapters"
    names = ra.make_store(model_dir, pool, big, rank=plan.rank, distinct=plan.distinct_files)
    stores = {}
    for n in sorted({c.adapters for c in plan.cells}):
        store = work / f"store-{n}"
        for name in names[:n]:
            ra.link_adapter(pool / name, store / name)
        ra.link_adapter(pool / names[0], store / WARM_UP)
        stores[n] = store
    return stores


def make_engine(plan: Plan, model_dir: Path, weights, store: Path):
    """A fresh engine over `weights`, adapters from `store`, its own Metrics (with StepAdapters)."""
    from server.config import Config
    from server.engine.cuda_graphs import batch_ladder
    from server.engine.engine import LLMEngine
    from server.metrics import Metrics

    cfg = Config()
    cfg.model.device, cfg.model.dtype, cfg.model.num_threads = plan.device, plan.dtype, plan.num_threads
    cfg.model.max_model_len = plan.prompt_len + plan.new_tokens + 16
    # The default ladder, up to the most rows a step of this run holds: the same graphs its batches
    # replay, without capturing (at start, twice per cell) the sizes 40..128 it never reaches.
    cfg.model.cuda_graph_sizes = batch_ladder(plan.streams)
    if plan.kv_cache_memory is not None:
        cfg.cache.kv_cache_memory = plan.kv_cache_memory
    cfg.lora.adapters_dir = str(store)
    cfg.lora.max_lora_rank = plan.rank
    for k, v in plan.lora_flags.items():
        setattr(cfg.lora, k, v)
    metrics = Metrics()
    metrics.step_adapters = StepAdapters(metrics.step_adapters)
    with gb.engine_weights(weights):
        return LLMEngine(cfg, model_dir, metrics)


def jobs_for(plan: Plan, cell: Cell, names: list[str]) -> list[closed_loop.Job]:
    """The cell's requests: workload.generate's adapter draws (the CPU scenario's), random prompt ids."""
    cfg = workload.WorkloadConfig(num_requests=plan.requests, adapters=tuple(names), zipf_s=cell.zipf, base_share=0.0,
                                  prompt_len=workload.LengthDist.parse(f"fixed:{plan.prompt_len}"),
                                  output_len=workload.LengthDist.parse(f"fixed:{plan.new_tokens}"), seed=0)
    prompts = gb.random_prompts(plan.requests, plan.prompt_len, plan.hf_config["vocab_size"], seed=cell.adapters)
    return [closed_loop.Job(sp, ids) for sp, ids in zip(workload.generate(cfg), prompts)]


def warm_up(plan: Plan, engine, deadline: float) -> None:
    """A short closed loop at the cell's concurrency, base and on WARM_UP, with staggered output
    lengths, so that the steps the timed loop runs (full and partial prefills, decodes, both mixed)
    have their kernel variants compiled and first allocations made here, not in the timed window."""
    n = 2 * plan.streams
    cfg = workload.WorkloadConfig(num_requests=n, adapters=(WARM_UP,), base_share=0.5, seed=1,
                                  prompt_len=workload.LengthDist.parse(f"fixed:{plan.prompt_len}"),
                                  output_len=workload.LengthDist.parse("uniform:2:9"))
    prompts = gb.random_prompts(n, plan.prompt_len, plan.hf_config["vocab_size"], seed=10**6)
    jobs = [closed_loop.Job(sp, ids) for sp, ids in zip(workload.generate(cfg), prompts)]
    closed_loop.run(engine, jobs, plan.streams, "warm-up", deadline)


def run_cell(plan: Plan, cell: Cell, model_dir: Path, weights, store: Path, deadline: float) -> dict:
    """One fresh engine, warm-up, then the timed closed loop. -> the row's measured fields."""
    t0 = time.perf_counter()
    engine = make_engine(plan, model_dir, weights, store)
    try:
        engine_s = time.perf_counter() - t0
        warm_up(plan, engine, deadline)
        warm_s = time.perf_counter() - t0 - engine_s
        names = [ra.adapter_name(i) for i in range(cell.adapters)]
        jobs = jobs_for(plan, cell, names)
        before = adapter_counters(engine.metrics)
        engine.metrics.step_adapters.values.clear()
        got = closed_loop.run(engine, jobs, plan.streams, f"n{cell.adapters}", deadline)
        after = adapter_counters(engine.metrics)
        per_step = engine.metrics.step_adapters.values
    finally:
        del engine
        gc.collect()  # the engine's loader callback makes a cycle: free its KV cache and pool now
        if plan.device == "cuda":
            gb.release_cached_memory()
    delta = {k: after[k] - before[k] for k in after}
    lookups = delta["hits"] + delta["misses"]
    wall = got["wall_s"]
    return dict(got, engine_s=round(engine_s, 2), warm_up_s=round(warm_s, 2),
                cache_hits=delta["hits"], cache_misses=delta["misses"],
                hit_rate=delta["hits"] / lookups if lookups else None, loads=delta["loads"],
                loads_per_s=delta["loads"] / wall if wall > 0 else None, slot_writes=delta["slot_writes"],
                evictions=delta["evictions"],
                step_adapters_mean=sum(per_step) / len(per_step) if per_step else None,
                step_adapters_max=max(per_step, default=None))


def ratios(rows: list[dict]) -> list[dict]:
    """Each many-adapter cell against the baseline (the first), for each of the issue's targets;
    value None unless both rows completed with every token."""
    base = rows[0] if rows and rows[0]["status"] == "ok" else None
    out = []
    for r in rows[1:]:
        for name, key, goal, higher in TARGETS:
            value = r[key] / base[key] if base is not None and r["status"] == "ok" and base[key] else None
            met = None if value is None else (value >= goal if higher else value <= goal)
            out.append(dict(name=f"{name}: {r['adapters']} adapters (Zipf {r['zipf']:g}) vs {rows[0]['adapters']} "
                                 f"(Zipf {rows[0]['zipf']:g})", target=(">= " if higher else "<= ") + f"{goal:g}",
                            value=value, met=met))
    return out


def run(plan: Plan, deadline: float, work: Path, on_row: Callable[[dict], None] | None = None) -> dict:
    """The scenario, every cell, by `deadline` (a time.monotonic() value); adapters and the model
    directory are written under `work`. -> the results dict (JSON-able; `markdown` renders it).
    `on_row(results so far)` when a cell starts (its row STARTED) and when its row is final, so a
    caller can keep them should this process die in the next cell (gpu_check.py)."""
    t_start = time.monotonic()
    res = not_run(plan)
    rows = res["rows"]

    def timed(what: str, make):
        t0 = time.perf_counter()
        value = make()
        if plan.device == "cuda":
            torch.cuda.synchronize()
        res["setup"][what] = round(time.perf_counter() - t0, 2)
        return value

    def skip(row: dict) -> bool:
        """A row is not started with less than min_cell_s left (a started one is cut at the deadline)."""
        left = deadline - time.monotonic()
        if left >= max(plan.min_cell_s, 0.01):
            return False
        row["status"] = (f"skipped: {left:.0f} s left, a row needs ~{plan.min_cell_s:.0f} s" if left > 0
                         else "skipped: deadline passed")
        return True

    def finish() -> dict:
        res["ratios"] = ratios(rows)
        res["elapsed_s"] = round(time.monotonic() - t_start, 1)
        return res

    def report() -> None:
        if on_row is not None:
            on_row(finish())

    if all(skip(row) for row in rows):  # nothing would run: no weights, no files
        return finish()
    weights = None
    try:
        from server.model.arch import ModelArch
        from server.model.random_weights import random_weights

        model_dir = timed("model directory (config + tokenizer)",
                          lambda: gb.write_model_dir(work / "model", plan.hf_config))
        arch = ModelArch.from_dir(model_dir)
        dtype = torch.bfloat16 if plan.dtype == "bfloat16" else torch.float32
        weights = timed("random weights on the device", lambda: random_weights(arch, dtype, torch.device(plan.device)))
        big = max(c.adapters for c in plan.cells)
        stores = timed(f"adapter stores ({big} names, {plan.distinct_files} random rank-{plan.rank} q/v files)",
                       lambda: make_stores(plan, model_dir, work))
        for cell, row in zip(plan.cells, rows):
            if skip(row):
                continue
            row["status"] = STARTED  # what the tables say if this process dies in the cell
            report()
            t0 = time.perf_counter()
            try:
                row.update(run_cell(plan, cell, model_dir, weights, stores[cell.adapters], deadline))
                if not row["tokens_ok"]:
                    row["status"] = (f"wrong token count: {row['short_requests']} requests returned other than "
                                     f"{plan.new_tokens} tokens")
                elif not row["complete"]:
                    row["status"] = f"cut at the deadline: {row['requests']} of {row['of']} requests finished"
                else:
                    row["status"] = "ok"
            except Exception as exc:  # OOM, a kernel error: this cell fails, the next still runs
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"  many adapters: {cell.adapters} adapters, Zipf {cell.zipf:g}: {row['status']}"
                  + (f", {row['output_tok_s']:.1f} tok/s" if row.get("output_tok_s") else ""), flush=True)
            report()
    except Exception as exc:  # setup failed: every cell not run says so
        res["notes"].append(f"setup failed: {type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
    finally:
        del weights
        gc.collect()
        if plan.device == "cuda":
            gb.release_cached_memory()
    return finish()


def not_run(plan: Plan, status: str = "not run") -> dict:
    """The results of a run that measured nothing: every cell's row says `status`."""
    rows = [dict(adapters=c.adapters, zipf=c.zipf, status=status, tokens_ok=None, seconds=None) for c in plan.cells]
    return dict(plan=_plan_dict(plan), setup={}, rows=rows, ratios=ratios(rows), notes=[])


def _plan_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["model"] = "Llama-3.1-8B shape" if plan.hf_config is gb.LLAMA_8B else "tiny Llama"
    del d["hf_config"]
    return d


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(res: dict) -> list[str]:
    """The section's lines (a `## ` heading, prose, two tables)."""
    p = res["plan"]
    flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in p["lora_flags"].items()) or "default LoRA flags"
    lines = ["## Many adapters (issue 11)", "",
             f"{p['model']} ({p['dtype']}, random weights), engine in-process, a fresh engine per row ({flags}); "
             f"random rank-{p['rank']} adapters on q_proj and v_proj ({p['distinct_files']} distinct weight files, the "
             f"other names hard-linked); {p['streams']} closed-loop streams, {p['requests']} requests of "
             f"{p['prompt_len']} random prompt tokens and {p['new_tokens']} output tokens (EOS ignored). Hit rate: "
             "host-cache hits / lookups (one per request); loads/s: adapter loads over the row's wall time; "
             f"adapters/step: distinct adapters in one engine step. Elapsed {res.get('elapsed_s', '-')} s.", ""]
    if res["setup"]:
        lines += ["Setup: " + "; ".join(f"{k} {v} s" for k, v in res["setup"].items()), ""]
    lines += ["| adapters | Zipf s | tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | hit rate | loads/s | "
              "adapters/step mean / max | requests | tokens | row s | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        def ms(key: str) -> str:
            return _num(None if r.get(key) is None else r[key] * 1000, ".0f")
        tokens = {True: "exact", False: "WRONG", None: "-"}[r["tokens_ok"]]
        done = f"{r['requests']}/{r['of']}" if "requests" in r else "-"
        lines.append(f"| {r['adapters']} | {r['zipf']:g} | {_num(r.get('output_tok_s'), '.1f')} | "
                     f"{ms('ttft_p50_s')} / {ms('ttft_p99_s')} | {ms('tpot_p50_s')} / {ms('tpot_p99_s')} | "
                     f"{_num(r.get('hit_rate'), '.2f')} | {_num(r.get('loads_per_s'), '.2f')} | "
                     f"{_num(r.get('step_adapters_mean'), '.1f')} / {_num(r.get('step_adapters_max'), 'd')} | "
                     f"{done} | {tokens} | {_num(r['seconds'], '.1f')} | {r['status']} |")
    lines += ["", "| target (issue 11) | goal | value | met |", "| --- | --- | --- | --- |"]
    for t in res["ratios"]:
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {t['target']} | {_num(t['value'], '.2f')} | {met} |")
    lines += [""] + [f"- {n}" for n in res["notes"]] + ([""] if res["notes"] else [])
    return lines


def tokens_bad(res: dict) -> bool:
    """True if a row returned other than the requested tokens (gpu_check's exit status)."""
    return any(r["tokens_ok"] is False for r in res["rows"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                    help="directory for gpu_many_adapters.md / .json (default: $OUT, else ./gpu_check_out)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model and counts: the control flow only")
    ap.add_argument("--budget-s", type=float, help="override the run's time budget (seconds)")
    args = ap.parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_many_adapters needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs on CPU")
        return 2
    budget = plan.budget_s if args.budget_s is None else args.budget_s
    deadline = time.monotonic() + budget
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_many_adapters-") as tmp:
        res = run(plan, deadline, Path(tmp))
    (args.out / "gpu_many_adapters.json").write_text(json.dumps(res, indent=1, default=str))
    text = "\n".join(markdown(res)) + "\n"
    (args.out / "gpu_many_adapters.md").write_text(text)
    print(text)
    return 1 if tokens_bad(res) else 0


if __name__ == "__main__":
    sys.exit(main())
