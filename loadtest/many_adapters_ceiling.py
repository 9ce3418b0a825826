"""The many-adapters ceiling (issue 11): the engine in-process, the scenario's request stream, no HTTP.

loadtest/many_adapters.py measures a server; this runs the same workload (the same generated
requests: Zipf over the adapters, closed-loop streams, fixed output lengths, `ignore_eos`) against
one `LLMEngine` driven by this thread, so the figures carry no HTTP or event-loop cost and the
cells can be compared in one process, interleaved, on a noisy machine. Each row says how many
requests came back short of their `max_tokens` (`short`; exit 1 if any did), and the run ends with
each count's throughput and TTFT p50 as a ratio of the smallest count's.

  --warm (the ceiling): every adapter the cell's stream uses is parsed into the host cache and
      written into the device pool before the clock starts, and both are sized to hold all of
      them, so no load and no slot write happens while timing: what is left is the per-step cost
      of the step's distinct adapters (the LoRA kernels reading their weights).
  --cold (profile): default flags, a fresh engine per cell, adapters loaded on demand as the
      server does; the report splits the engine thread's time (slot writes, LoRA kernels) and
      the loader thread's (loads).

A cell of 0 adapters runs the same stream on the base model (the cost of LoRA itself).

    python -m loadtest.many_adapters_ceiling --counts 8 1000 --zipf 1.0 --streams 32 --requests 64 \\
        --max-tokens 64 --warm --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import closed_loop, workload
from loadtest.many_adapters import Scenario, make_store


@dataclass
class Timers:
    """Seconds spent inside a few functions (patched for one cell): a cheap profile by counters."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @contextlib.contextmanager
    def patched(self, targets: dict[str, tuple[object, str]]):
        saved = []
        for label, (owner, attr) in targets.items():
            fn = getattr(owner, attr)
            saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(label, fn))
        try:
            yield self
        finally:
            for owner, attr, fn in saved:
                setattr(owner, attr, fn)

    def _wrap(self, label, fn):
        lock = threading.Lock()

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                where = label if threading.current_thread() is threading.main_thread() else f"{label}[loader]"
                with lock:
                    self.seconds[where] += dt
                    self.calls[where] += 1
        return timed


@contextlib.contextmanager
def skip_unadapted_groups():
    """What-if, for measurement only: a step's LoRA skips a projection group that none of the
    step's slots adapts (exact: those slots hold zeros there). Patched over LoraStep.apply for plain
    steps (no mixtures, routes or DoRA tokens)."""
    from server.engine.backends.lora import LoraStep

    apply = LoraStep.apply

    def skipping(self, layer, group, x, y, bias):
        if self.rows is None and self.routed is None and self.dora is None:
            groups = self.slots.slot_groups
            if not any(group in groups[s] for s in self.segments.seg_slots):
                return
        apply(self, layer, group, x, y, bias)

    LoraStep.apply = skipping
    try:
        yield
    finally:
        LoraStep.apply = apply


def make_engine(model: Path, store: Path, rank: int, lora_args: dict):
    from server.config import Config
    from server.engine.engine import LLMEngine

    cfg = Config()
    cfg.model.num_threads = 1
    cfg.lora.adapters_dir = str(store)
    cfg.lora.max_lora_rank = rank
    for k, v in lora_args.items():
        setattr(cfg.lora, k, v)
    return LLMEngine(cfg, model)


def requests_for(sc: Scenario, names: list[str], s: float) -> list[workload.RequestSpec]:
    cfg = workload.WorkloadConfig(num_requests=sc.requests, adapters=tuple(names), zipf_s=s,
                                  base_share=0.0 if names else 1.0,
                                  prompt_len=workload.LengthDist.parse(sc.prompt_len),
                                  output_len=workload.LengthDist.parse(f"fixed:{sc.max_tokens}"), seed=0)
    return workload.generate(cfg)


def warm(engine, adapters: set[str]) -> None:
    """Every adapter of `adapters` in the host cache and in the device pool (no clock running)."""
    mgr = engine.adapters
    refs = [mgr.lookup(None, a) for a in sorted(adapters)]
    mgr.prefetch(refs, keep=set(refs))
    deadline = time.monotonic() + 600
    while not all(mgr.is_ready(r) for r in refs):
        if time.monotonic() > deadline:
            raise RuntimeError("adapters did not load in 600 s")
        mgr.prefetch(refs, keep=set(refs))
        mgr.poll(lambda: refs)
        time.sleep(0.01)
    step = max(1, mgr.step_capacity)
    for i in range(0, len(refs), step):  # written into the pool, a step's worth at a time
        mgr.activate(refs[i:i + step])


def run_cell(engine, specs: list[workload.RequestSpec], streams: int, tag: str) -> dict:
    """Closed loop: `streams` requests in flight, the next submitted when one finishes."""
    tok = engine.tokenizer
    return closed_loop.run(engine, [closed_loop.Job(sp, tok.encode(sp.prompt)) for sp in specs], streams, tag)


def timers_for():
    from server.adapters.host_cache import HostAdapterCache
    from server.adapters.manager import AdapterManager
    from server.adapters.slots import LoraSlots
    from server.engine.backends.lora import LoraStep
    from server.engine.model_runner import ModelRunner

    return {"step.execute": (ModelRunner, "execute"), "lora.kernels": (LoraStep, "apply"),
            "activate": (AdapterManager, "activate"), "slot_write": (LoraSlots, "_write"),
            "load (loader thread)": (HostAdapterCache, "_load")}


def format_row(r: dict) -> str:
    prof = " ".join(f"{k}={v:.2f}s/{r['calls'][k]}" for k, v in r["seconds"].items())
    return (f"{r['label']:>14} {r['adapters']:>5} {r['zipf']:>4} {r['distinct_used']:>4} {r['short_requests']:>5} "
            f"{r['output_tok_s']:>7.1f} "
            f"{r['ttft_p50_s'] * 1000:>7.0f} {r['ttft_p99_s'] * 1000:>7.0f} {r['tpot_p50_s'] * 1000:>6.0f} "
            f"{r['wall_s']:>6.1f} {r['steps']:>5} {r['idle_s']:>5.1f}  {prof}")


HEADER = ("         label  adpt zipf used short   tok/s ttft_50 ttft_99 tpot50   wall steps  idle  profile (seconds/calls)\n"
          "                                           (ms)    (ms)   (ms)    (s)         (s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: the default model)")
    p.add_argument("--counts", type=int, nargs="+", default=[8, 1000], help="adapters registered; 0: the base model")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", default="fixed:32")
    p.add_argument("--rank", type=int, default=16)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--warm", action="store_true", help="the ceiling: every used adapter resident before timing")
    mode.add_argument("--cold", action="store_true", help="server-like: default flags, a fresh engine per cell")
    p.add_argument("--repeats", type=int, default=1, help="the cells run this many times, interleaved")
    p.add_argument("--profile", action="store_true", help="time slot writes, loads and the LoRA kernels")
    p.add_argument("--lora-dtype", nargs="+", default=["auto"],
                   help="--lora-dtype of the engine; several: one engine each, cells interleaved")
    p.add_argument("--what-if-skip", action="store_true",
                   help="also run each cell with unadapted projection groups skipped (skip_unadapted_groups)")
    p.add_argument("--out", type=Path, help="write the rows (JSON) here")
    args = p.parse_args(argv)
    from server.model.default_model import default_model_dir

    model = args.model or default_model_dir()
    sc = Scenario(model, [max(args.counts)], [args.zipf], args.streams, args.requests, args.prompt_len,
                  args.max_tokens, args.rank)
    rows = []
    with tempfile.TemporaryDirectory(prefix="many-ceiling-") as tmp:
        tmp_path = Path(tmp)
        store = tmp_path / "store"
        names = make_store(sc, tmp_path / "pool", store, max(args.counts))  # the N-adapter cell uses the first N
        cells = {n: requests_for(sc, names[:n], args.zipf) for n in args.counts}
        used = {n: {sp.adapter for sp in specs if sp.adapter} for n, specs in cells.items()}
        print(HEADER, flush=True)
        engines = {}
        if args.warm:
            everything = set().union(*used.values())
            for dt in args.lora_dtype:
                # Host cache and pool hold every adapter any cell uses: nothing loads or moves while timing.
                engines[dt] = make_engine(model, store, args.rank, {"max_cpu_loras": max(64, len(everything)),
                                                                    "lora_dtype": dt})
                warm(engines[dt], everything)
        for rep in range(args.repeats):
            for dt, skip in itertools.product(args.lora_dtype, (False, True) if args.what_if_skip else (False,)):
                label = f"{'warm' if args.warm else 'cold'}:{dt}{'+skip' if skip else ''}"
                for n in args.counts:
                    engine = engines[dt] if args.warm else make_engine(model, store, args.rank, {"lora_dtype": dt})
                    timers = Timers()
                    with contextlib.ExitStack() as patches:
                        if args.profile:
                            patches.enter_context(timers.patched(timers_for()))
                        if skip:
                            patches.enter_context(skip_unadapted_groups())
                        row = run_cell(engine, cells[n], args.streams, f"{label}{rep}-{n}")
                    row.update(label=label, adapters=n, zipf=args.zipf, repeat=rep, seconds=dict(timers.seconds),
                               calls=dict(timers.calls))
                    print(format_row(row), flush=True)
                    rows.append(row)
                    del engine  # a cold cell's engine goes with its memory
    by_n = defaultdict(list)
    for r in rows:
        by_n[(r["label"], r["adapters"])].append(r)
    adapter_counts = sorted(n for n in args.counts if n)
    pairs = [(adapter_counts[0], n) for n in adapter_counts[1:]] + [(0, n) for n in adapter_counts if 0 in args.counts]
    for label in dict.fromkeys(r["label"] for r in rows):
        for lo, hi in pairs:  # per repeat: each pair ran back to back
            for key in ("output_tok_s", "ttft_p50_s"):
                ratios = [b[key] / a[key] for a, b in zip(by_n[(label, lo)], by_n[(label, hi)])]
                print(f"{label} {key}: {hi} vs {lo} adapters = " + ", ".join(f"{x:.3f}x" for x in ratios),
                      flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    short = sum(r["short_requests"] for r in rows)
    if short:  # closed_loop checks every finished request against its max_tokens
        print(f"{short} requests returned other than their max_tokens", file=sys.stderr)
    return 1 if short else 0


if __name__ == "__main__":
    raise SystemExit(main())
