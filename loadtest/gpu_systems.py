"""gpu_check.py's decode benchmark: the systems it compares, built lazily over one set of random
weights (each build timed into `Bench.setup`), one runner per benchmark row, and the section
itself (`run_bench`: every row by the section's deadline)."""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loadtest import gpu_bench as gb
from server.model.arch import ModelArch
from server.model.random_weights import random_weights

if TYPE_CHECKING:
    from loadtest.gpu_check import Budget, Plan


@dataclass(frozen=True)
class Unit:
    """One benchmark row: `system` decoding `streams` sequences over `adapters` distinct adapters
    (0: base model only)."""

    system: str  # loramux [--no-lora | --enforce-eager | --async-scheduling] | transformers | peft
    adapters: int
    streams: int


@dataclass
class Bench:
    """Everything the benchmark units share; built lazily, each step timed into `setup`."""

    plan: Plan
    work: Path
    setup: dict[str, float] = field(default_factory=dict)
    objects: dict = field(default_factory=dict)

    def timed(self, what: str, make):
        if what not in self.objects:
            t0 = time.perf_counter()
            self.objects[what] = make()
            if self.plan.device == "cuda":
                torch.cuda.synchronize()
            self.setup[what] = round(time.perf_counter() - t0, 2)
        return self.objects[what]

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def max_len(self) -> int:
        return self.plan.prompt_len + self.plan.new_tokens + 16

    def model_dir(self) -> Path:
        return self.timed("model directory (config + tokenizer)",
                          lambda: gb.write_model_dir(self.work / "model", self.plan.hf_config))

    def arch(self) -> ModelArch:
        return ModelArch.from_dir(self.model_dir())

    def weights(self):
        dtype = torch.bfloat16 if self.plan.dtype == "bfloat16" else torch.float32
        return self.timed("random weights on the device", lambda: random_weights(self.arch(), dtype, self.device))

    def adapter_dirs(self) -> dict[str, Path]:
        dtype = self.weights().embed.dtype
        return self.timed(f"{max(self.plan.adapter_counts)} PEFT adapter directories (rank {gb.LORA_RANK}, written)",
                          lambda: gb.write_adapters(self.work / "adapters", self.arch(),
                                                    max(self.plan.adapter_counts), dtype, self.device))

    def engine(self, lora: bool, eager: bool = False):
        """loramux over the shared weights; CUDA graphs for decode unless `eager` (--enforce-eager), captured
        at the benchmark's stream counts only (its decode batches), not the whole ladder: 8 captures, not 70."""
        def make():
            return gb.make_engine(self.model_dir(), self.weights(), lora=lora,
                                  adapters=self.adapter_dirs() if lora else {}, max_seqs=max(self.plan.streams),
                                  max_len=self.max_len, device=self.plan.device, dtype=self.plan.dtype,
                                  enforce_eager=eager, graph_sizes=tuple(sorted(set(self.plan.streams))))
        name = "engine, LoRA enabled" if lora else "engine, --no-lora"
        return self.timed(name + (", --enforce-eager" if eager else ""), make)

    def hf(self):
        return self.timed("transformers model (views of the same weights)",
                          lambda: gb.hf_model_over(self.weights(), self.plan.hf_config))

    def peft(self, n: int, seconds_left: float):
        """PEFT over the transformers model with the first `n` adapters; SkipUnit if loading the
        missing ones would, at the rate of the first load, take longer than `seconds_left`."""
        names = list(self.adapter_dirs())[:n]
        have = self.objects.get("peft adapters", [])
        todo = {a: self.adapter_dirs()[a] for a in names if a not in have}
        if todo:
            rate = self.objects.get("peft s/adapter")
            if rate is not None and rate * len(todo) > seconds_left:
                raise SkipUnit(f"skipped: loading {len(todo)} more PEFT adapters would take ~{rate * len(todo):.0f} s")
            model = self.hf()
            t0 = time.perf_counter()
            self.objects["peft"] = gb.load_peft(model, todo, self.objects.get("peft"))
            self.objects["peft adapters"] = have + list(todo)
            seconds = time.perf_counter() - t0
            self.objects["peft s/adapter"] = seconds / len(todo)
            self.setup[f"PEFT: load {len(todo)} adapters"] = round(seconds, 2)
        return self.objects["peft"]

    def runner(self, unit: Unit, seconds_left: float = float("inf")):
        """-> run(new_tokens) -> seconds."""
        prompts = gb.random_prompts(unit.streams, self.plan.prompt_len, self.plan.hf_config["vocab_size"],
                                    seed=unit.streams)
        names = list(self.adapter_dirs())[:unit.adapters] if unit.adapters else []
        rows = [names[i % len(names)] for i in range(unit.streams)] if names else [None] * unit.streams
        if unit.system.startswith("loramux"):
            engine = self.engine(lora=unit.system != "loramux --no-lora",
                                 eager=unit.system.endswith("--enforce-eager"))
            overlap = unit.system.endswith("--async-scheduling")  # the same engine, scheduling ahead
            run = lambda n: gb.engine_time(engine, prompts, rows, n, async_scheduling=overlap)  # noqa: E731
        elif unit.system == "transformers":
            model = self.hf()
            if "peft" in self.objects:  # PEFT wrapped the same modules: run them bare
                base = self.objects["peft"]
                run = lambda n: _without_adapters(base, lambda: gb.hf_time(model, prompts, n))  # noqa: E731
            else:
                run = lambda n: gb.hf_time(model, prompts, n)  # noqa: E731
        else:
            model = self.peft(unit.adapters, seconds_left)
            run = lambda n: gb.hf_time(model, prompts, n, adapter_names=rows)  # noqa: E731
        return run


STARTED = "started"  # a row's status while its unit runs


class SkipUnit(Exception):
    """This benchmark row would not fit in the time left; the message says why."""


def _without_adapters(peft_model, fn):
    with peft_model.disable_adapter():
        return fn()


# --- the section -----------------------------------------------------------------------------------


def units(plan: Plan) -> list[Unit]:
    """Every row, the ones the issue's targets read first, so a short budget still yields them."""
    few, B = plan.adapter_counts[0], plan.target_streams
    first = [Unit("loramux", 0, 1), Unit("loramux --no-lora", 0, 1), Unit("loramux", 0, B),
             Unit("loramux", few, B), Unit("loramux --no-lora", 0, B), Unit("peft", few, B),
             Unit("transformers", 0, B), Unit("transformers", 0, 1),
             # what the CUDA graphs bring: the same engine, every step eager
             Unit("loramux --enforce-eager", 0, 1), Unit("loramux --enforce-eager", few, B),
             Unit("loramux --enforce-eager", 0, B),
             # what overlapping the host's work with the GPU's brings
             Unit("loramux --async-scheduling", 0, 1), Unit("loramux --async-scheduling", few, B),
             Unit("loramux --async-scheduling", 0, B)]
    rest = [Unit("loramux", a, s) for a in (0, *plan.adapter_counts) for s in plan.streams]
    rest += [Unit("loramux --no-lora", 0, s) for s in plan.streams]
    rest += [Unit("loramux --async-scheduling", a, plan.streams[-1]) for a in (0, plan.adapter_counts[0])]
    rest += [Unit("transformers", 0, s) for s in plan.streams]
    rest += [Unit("peft", a, s) for a in plan.adapter_counts for s in plan.streams]
    return first + [u for u in rest if u not in first]


def skip_status(plan: Plan, budget: Budget, deadline: float) -> str | None:
    """Why a benchmark unit cannot start now, or None if it can."""
    if deadline - budget.clock() >= max(plan.min_unit_s, 0.01):
        return None
    return "skipped: time cap" if budget.left() > 0 else "skipped: run budget spent"


def run_bench(plan: Plan, budget: Budget, deadline: float, work: Path, results: dict, flush) -> None:
    """Every unit's row into results["rows"] by `deadline` (a clock value), `flush` after each."""
    results["rows"] = []
    if skip_status(plan, budget, deadline):  # nothing would run: no weights, no adapters, no CUDA
        for unit in units(plan):
            results["rows"].append(dict(asdict(unit), status=skip_status(plan, budget, deadline), tok_s=None,
                                        floor_tok_s=None, tokens_ok=None, seconds=None, step_bytes=None))
        flush()
        return
    bench = Bench(plan, work)
    results["setup"] = bench.setup
    for make in (bench.model_dir, bench.weights, bench.adapter_dirs):  # in order: each timed on its own
        make()
    bw = gb.copy_bandwidth(bench.device, plan.copy_bytes)
    results["floor"] = dict(copy_bytes_per_s=bw, copy_bytes=plan.copy_bytes,
                            context=plan.prompt_len + plan.new_tokens / 2,
                            note="bytes read per decode step / measured copy bandwidth (read + write bytes)")
    arch = bench.arch()
    elem = 2 if plan.dtype == "bfloat16" else 4
    warmed: set[tuple[str, int, int]] = set()
    last: dict[str, tuple[int, float]] = {}  # system -> (streams, seconds) of its last row
    for unit in units(plan):
        sb = gb.step_bytes(arch, unit.streams, results["floor"]["context"], min(unit.adapters, unit.streams), elem)
        row = dict(asdict(unit), status="", tok_s=None, floor_tok_s=unit.streams / (sb.total / bw), tokens_ok=None,
                   seconds=None, step_bytes=asdict(sb))
        results["rows"].append(row)
        left = deadline - budget.clock()
        if skip_status(plan, budget, deadline):
            row["status"] = skip_status(plan, budget, deadline)
            flush()
            continue
        if unit.system in last:  # a row costs about its system's last one, scaled by the batch
            prev_streams, prev_s = last[unit.system]
            guess = prev_s * max(1.0, unit.streams / prev_streams)
            if guess > left:
                row["status"] = f"skipped: would take ~{guess:.0f} s, {left:.0f} s left"
                continue
        row["status"] = STARTED  # what the tables say if this process dies in the unit
        flush()
        t0 = time.perf_counter()
        try:
            run = bench.runner(unit, left)
            key = (unit.system, unit.adapters, unit.streams)
            if key not in warmed:  # compile (kernel variants follow the batch's token count), allocate, load
                tw = time.perf_counter()
                run(2)
                warmed.add(key)
                bench.setup[f"warm-up: {unit.system}, {unit.adapters or 'no'} adapters, {unit.streams} streams"] = \
                    round(time.perf_counter() - tw, 2)
            t1 = time.perf_counter()
            row["tok_s"] = gb.decode_tps(run, unit.streams, plan.new_tokens, plan.repeats)
            last[unit.system] = (unit.streams, time.perf_counter() - t1)
            row["tokens_ok"] = True
            row["status"] = "ok"
        except SkipUnit as exc:
            row["status"] = str(exc)
        except gb.TokenCountError as exc:
            row.update(tokens_ok=False, status=f"wrong token count: {exc}")
        except Exception as exc:  # OOM, a kernel error: this row fails, the others still run
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
            if plan.device == "cuda":
                gb.release_cached_memory()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  {unit.system:<18} adapters {unit.adapters:>3} streams {unit.streams:>4}: {row['status']}"
              + (f", {row['tok_s']:.1f} tok/s" if row["tok_s"] else ""), flush=True)
        flush()
    bench.objects.clear()
    gc.collect()  # engines hold reference cycles (the loader callback): their KV caches and pools go now
    if plan.device == "cuda":
        gb.release_cached_memory()
