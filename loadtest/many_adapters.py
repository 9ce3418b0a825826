"""The `many-adapters` scenario (issue 11, item 5): throughput and latency against the number of
adapters and their popularity skew, with a host cache smaller than the set.

For each adapter count N (a store of N random PEFT adapters of the model, loadtest/random_adapters.py)
and each Zipf exponent s, a fresh server is started (so no cell inherits another's cache) and
`--streams` closed-loop clients send `--requests` streaming requests, adapter rank k drawn with
P(k) ~ 1 / (k + 1) ** s. Reported per cell: output tokens/s, TTFT and TPOT p50/p99, and from the
server's /metrics the host-cache hit rate (hits / (hits + misses), one lookup per request) and
adapter loads per second; every request is checked to return its `--max-tokens` tokens (`short`:
those that did not). Then, per Zipf exponent, each count's throughput and TTFT p50 as a ratio of
the smallest count's (the baseline, measured in the same run). Exits 1 if a request failed or
came back short.

    python -m loadtest.many_adapters --tiny --counts 8 64 512 --zipf 0.5 1.0 1.5 --out many.json
    python -m loadtest.many_adapters --model DIR --counts 8 64 512 1000 10000 --streams 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import report, run, svg_plot, workload
from loadtest.random_adapters import adapter_name, link_adapter, write_adapter

ROOT = Path(__file__).resolve().parent.parent
HITS, MISSES = "loramux_adapter_cache_hits_total", "loramux_adapter_cache_misses_total"
LOADS = "loramux_adapter_loads_total"


@dataclass
class Scenario:
    model: Path
    counts: list[int]
    zipf: list[float]
    streams: int = 32
    requests: int = 128
    prompt_len: str = "fixed:32"
    max_tokens: int = 64
    rank: int = 16
    distinct: int = 16  # adapters with their own random weights; the rest hard-link them
    duration_s: float = 300.0
    server_args: list[str] = field(default_factory=list)  # e.g. --max-cpu-loras 64 --max-loras 8


def make_store(sc: Scenario, pool: Path, store: Path, n: int) -> list[str]:
    """N adapters in `store`, hard-linked from `pool` (made once, `distinct` adapters)."""
    for i in range(min(sc.distinct, n)):
        if not (pool / adapter_name(i)).is_dir():
            write_adapter(sc.model, pool / adapter_name(i), rank=sc.rank, seed=i)
    for i in range(n):
        link_adapter(pool / adapter_name(i % sc.distinct), store / adapter_name(i))
    return [adapter_name(i) for i in range(n)]


def run_cell(sc: Scenario, store: Path, names: list[str], s: float, log: Path) -> dict:
    """One server on `store`, one workload at Zipf `s`: the cell's row."""
    sys.path.insert(0, str(ROOT / "tests"))
    from server_process import ServerProcess  # the launcher the tests use

    cfg = workload.WorkloadConfig(num_requests=sc.requests, adapters=tuple(names), zipf_s=s, base_share=0.0,
                                  prompt_len=workload.LengthDist.parse(sc.prompt_len),
                                  output_len=workload.LengthDist.parse(f"fixed:{sc.max_tokens}"), seed=0)
    specs = workload.generate(cfg)
    srv = ServerProcess(["--model", str(sc.model), "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-lora-rank", str(sc.rank), *sc.server_args], log)
    try:
        data = asyncio.run(run.run(specs, srv.base_url, max_concurrency=sc.streams, duration_s=sc.duration_s,
                                   drain_s=60.0, timeout_s=sc.duration_s))
    finally:
        srv.stop()
    summary = report.summarize(data)
    want = {sp.index: sp.max_tokens for sp in specs}
    short = sum(1 for r in data["results"] if r["error"] is None and r["e2e_s"] is not None
                and r["completion_tokens"] != want[r["index"]])
    server = data["server"]
    lookups = server.get(HITS, 0.0) + server.get(MISSES, 0.0)
    wall = data["meta"]["wall_s"]
    return {"adapters": len(names), "zipf": s, "requests": summary["sent"], "ok": summary["ok"],
            "errors": summary["errors"], "short": short, "distinct_used": len({sp.adapter for sp in specs}),
            "output_tok_s": summary["output_token_throughput"],
            "ttft_p50_s": summary["ttft"]["p50"], "ttft_p99_s": summary["ttft"]["p99"],
            "tpot_p50_s": summary["tpot"]["p50"], "tpot_p99_s": summary["tpot"]["p99"],
            "cache_hits": server.get(HITS, 0.0), "cache_misses": server.get(MISSES, 0.0),
            "hit_rate": server.get(HITS, 0.0) / lookups if lookups else None,
            "loads": server.get(LOADS, 0.0), "loads_per_s": server.get(LOADS, 0.0) / wall if wall else 0.0}


def run_scenario(sc: Scenario, tmp: Path) -> list[dict]:
    rows = []
    pool = tmp / "pool"
    for n in sc.counts:
        store = tmp / f"store-{n}"
        names = make_store(sc, pool, store, n)
        for s in sc.zipf:
            row = run_cell(sc, store, names, s, tmp / f"server-{n}-{s}.log")
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def format_row(r: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
    return (f"{r['adapters']:>6} {r['zipf']:>4} {r['ok']:>4}/{r['requests']:<4} {r['short']:>5} "
            f"{r['output_tok_s']:>8.1f} "
            f"{ms(r['ttft_p50_s']):>8} {ms(r['ttft_p99_s']):>8} {ms(r['tpot_p50_s']):>7} {ms(r['tpot_p99_s']):>7} "
            f"{hit:>5} {r['loads_per_s']:>7.2f}")


HEADER = ("  adpt zipf   ok/req short     tok/s ttft_p50 ttft_p99 tpot_50 tpot_99   hit loads/s\n"
          "                                           (ms)     (ms)    (ms)    (ms)")


def ratio_lines(rows: list[dict]) -> list[str]:
    """Per Zipf exponent: each adapter count against the smallest one of the run (the baseline)."""
    lines = []
    for s in sorted({r["zipf"] for r in rows}):
        cells = sorted((r for r in rows if r["zipf"] == s), key=lambda r: r["adapters"])
        base = cells[0]
        for r in cells[1:]:
            tps = r["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else float("nan")
            ttft = (r["ttft_p50_s"] / base["ttft_p50_s"] if r["ttft_p50_s"] is not None and base["ttft_p50_s"]
                    else float("nan"))
            lines.append(f"zipf {s}: {r['adapters']} vs {base['adapters']} adapters: throughput {tps:.2f}x, "
                         f"TTFT p50 {ttft:.2f}x")
    return lines


def plot(rows: list[dict], caption: str = "") -> str:
    """An SVG: output tok/s and median TTFT against the adapter count, one line per Zipf exponent."""
    counts = sorted({r["adapters"] for r in rows})
    cells = {(r["adapters"], r["zipf"]): r for r in rows}
    zipfs = sorted({r["zipf"] for r in rows})

    def series(key: str, scale: float = 1.0) -> dict[str, list[float | None]]:
        return {f"zipf {s}": [cells[(n, s)][key] * scale if (n, s) in cells and cells[(n, s)][key] is not None
                              else None for n in counts] for s in zipfs}

    xs = [str(n) for n in counts]
    return svg_plot.figure([svg_plot.panel("output tokens/s", xs, series("output_tok_s"), "tok/s"),
                            svg_plot.panel("TTFT p50", xs, series("ttft_p50_s"), "s", x0=svg_plot.W),
                            svg_plot.panel("host-cache hit rate", xs, series("hit_rate"), "hits / lookups",
                                           x0=2 * svg_plot.W)], caption)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="model directory (default: the default model)")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama (tests/conftest.py), in a temp dir")
    p.add_argument("--counts", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--zipf", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", default="fixed:32")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, help="write the rows (JSON) here")
    p.add_argument("--svg", type=Path, help="write a plot (SVG) here: tok/s, TTFT p50, hit rate against N")
    p.add_argument("server_args", nargs="*", help="after --: extra server flags, e.g. -- --max-cpu-loras 64")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="many-adapters-") as tmp:
        tmp_path = Path(tmp)
        if args.tiny:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import save_tiny_model

            model = save_tiny_model(tmp_path / "tiny", "llama")
        else:
            from server.model.default_model import default_model_dir

            model = args.model or default_model_dir()
        sc = Scenario(model, args.counts, args.zipf, args.streams, args.requests, args.prompt_len, args.max_tokens,
                      args.rank, server_args=args.server_args)
        print(HEADER, flush=True)
        rows = run_scenario(sc, tmp_path)
    for line in ratio_lines(rows):
        print(line)
    if args.svg:
        args.svg.write_text(plot(rows, f"{args.streams} streams, {args.requests} requests x {args.max_tokens} tokens"
                                       f" per cell; x: adapters registered"))
    if args.out:
        args.out.write_text(json.dumps({"scenario": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(sc).items()}, "rows": rows}, indent=1))
    bad = [r for r in rows if r["errors"] or r["short"] or r["ok"] < r["requests"]]
    for r in bad:
        print(f"{r['adapters']} adapters, zipf {r['zipf']}: {r['requests'] - r['ok']} requests not served, "
              f"{r['short']} short", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
