"""Summarize a loadtest run: throughput, latency percentiles, errors; optional plots.

Definitions (the ones vLLM's benchmark_serving uses, so numbers compare):
- TTFT: request sent -> first streamed chunk carrying text.
- TPOT: per request, (e2e - TTFT) / (completion_tokens - 1); requests with > 1 token.
- ITL:  every gap between consecutive text-carrying chunks, pooled over requests.
- E2E:  request sent -> `[DONE]` (or the whole response, when not streaming).
- Throughput: successful requests (and their tokens) / the time from the first send to the
  last completion.
Percentiles interpolate linearly between samples (numpy's default).
Per tenant (runs with `--tenant`): requests, answers, 429s (rate limited), 503s (server full),
other errors, TTFT and E2E percentiles of the answers, and output tokens/s over the run.

    python -m loadtest.report results.json [--plots plots/] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

QUANTILES = (0.50, 0.95, 0.99)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict:
    """count, mean, p50, p95, p99, max of `values` (None where there are none)."""
    out = {"count": len(values), "mean": sum(values) / len(values) if values else None}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = percentile(values, q)
    out["max"] = max(values) if values else None
    return out


def _tpot(r: dict) -> float | None:
    n = r.get("completion_tokens")
    if r.get("ttft_s") is None or r.get("e2e_s") is None or not n or n < 2:
        return None
    return (r["e2e_s"] - r["ttft_s"]) / (n - 1)


def summarize(data: dict) -> dict:
    """The numbers of a run, from the dict that loadtest/run.py writes."""
    results = data.get("results", [])
    meta = data.get("meta", {})
    ok = [r for r in results if r.get("error") is None and r.get("e2e_s") is not None]
    # "cancelled": still in flight when the run's own time bound ran out; not the server's fault.
    errors = Counter(r["error"] for r in results if r.get("error") not in (None, "cancelled"))
    cancelled = sum(r.get("error") == "cancelled" for r in results)
    disconnected = sum(bool(r.get("disconnected")) for r in results)  # the workload's own hang-ups
    examples: dict[str, str] = {}  # one message per error kind: enough to tell what went wrong
    for r in results:
        if r.get("error") in errors and r.get("detail"):
            examples.setdefault(r["error"], r["detail"])
    ends = [r["start_s"] + r["e2e_s"] for r in ok]
    starts = [r["start_s"] for r in results if r.get("start_s") is not None]
    duration = (max(ends) - min(starts)) if ends and starts else 0.0
    out_tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    in_tokens = sum(r.get("prompt_tokens") or 0 for r in ok)
    streamed = [r for r in ok if r.get("stream")]
    per_adapter: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        per_adapter[r.get("adapter") or "<base>"].append(r)
    per_tenant: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r.get("tenant") is not None:
            per_tenant[r["tenant"]].append(r)
    tenants = {}
    for name, rs in sorted(per_tenant.items()):
        good = [r for r in rs if r.get("error") is None and r.get("e2e_s") is not None]
        status = Counter(r.get("status") for r in rs if r.get("error") not in (None, "cancelled"))
        tenants[name] = {"requests": len(rs), "ok": len(good), "rate_limited": status[429], "overloaded": status[503],
                         "errors": sum(r.get("error") not in (None, "cancelled") for r in rs) - status[429]
                         - status[503],
                         "output_token_throughput": sum(r.get("completion_tokens") or 0 for r in good) / duration
                         if duration > 0 else 0.0,
                         "ttft": stats([r["ttft_s"] for r in good if r.get("ttft_s") is not None]),
                         "e2e": stats([r["e2e_s"] for r in good])}
    adapters = {}
    for name, rs in sorted(per_adapter.items(), key=lambda kv: -len(kv[1])):
        good = [r for r in rs if r.get("error") is None and r.get("e2e_s") is not None]
        adapters[name] = {"requests": len(rs), "errors": sum(r.get("error") not in (None, "cancelled") for r in rs),
                          "ttft": stats([r["ttft_s"] for r in good if r.get("ttft_s") is not None]),
                          "e2e": stats([r["e2e_s"] for r in good])}
    return {
        "requests": meta.get("num_requests", len(results)),
        "sent": len(results),
        "not_sent": meta.get("not_sent", 0),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "cancelled": cancelled,
        "disconnected": disconnected,
        "error_kinds": dict(errors.most_common()),
        "error_examples": examples,
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_token_throughput": out_tokens / duration if duration > 0 else 0.0,
        "input_token_throughput": in_tokens / duration if duration > 0 else 0.0,
        "completion_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "ttft": stats([r["ttft_s"] for r in streamed if r.get("ttft_s") is not None]),
        "tpot": stats([t for t in (_tpot(r) for r in streamed) if t is not None]),
        "itl": stats([x for r in streamed for x in r.get("itl_s") or ()]),
        "e2e": stats([r["e2e_s"] for r in ok]),
        "adapters": adapters,
        "tenants": tenants,
        "server": data.get("server", {}),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def format_summary(s: dict, max_adapters: int = 10) -> str:
    """A plain-text table of a summary."""
    not_sent = f" ({s['not_sent']} not sent: duration limit)" if s["not_sent"] else ""
    lines = [
        f"requests      {s['ok']} ok / {s['sent']} sent / {s['requests']} planned{not_sent}"
        + (f"; {s['disconnected']} disconnected mid-stream by design" if s.get("disconnected") else ""),
        f"errors        {s['errors']}" + (f"  {s['error_kinds']}" if s["errors"] else "")
        + (f"; {s['cancelled']} cancelled at the drain deadline" if s.get("cancelled") else ""),
        *(f"  {kind}: {msg}" for kind, msg in s.get("error_examples", {}).items()),
        f"duration      {s['duration_s']:.2f} s",
        f"throughput    {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s, "
        f"{s['input_token_throughput']:.1f} prompt tok/s",
        "",
        f"{'latency (ms)':<14}{'n':>7}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        st = s[key]
        lines.append(f"{label:<14}{st['count']:>7}{_ms(st['mean']):>10}{_ms(st['p50']):>10}{_ms(st['p95']):>10}"
                     f"{_ms(st['p99']):>10}{_ms(st['max']):>10}")
    if len(s["adapters"]) > 1 or any(name != "<base>" for name in s["adapters"]):
        lines += ["", f"{'target':<24}{'reqs':>6}{'errs':>6}{'TTFT p50':>10}{'TTFT p95':>10}{'E2E p50':>10}"
                  f"{'E2E p95':>10}"]
        for name, a in list(s["adapters"].items())[:max_adapters]:
            lines.append(f"{name[:23]:<24}{a['requests']:>6}{a['errors']:>6}{_ms(a['ttft']['p50']):>10}"
                         f"{_ms(a['ttft']['p95']):>10}{_ms(a['e2e']['p50']):>10}{_ms(a['e2e']['p95']):>10}")
        if len(s["adapters"]) > max_adapters:
            lines.append(f"... {len(s['adapters']) - max_adapters} more")
    if s.get("tenants"):
        lines += ["", f"{'tenant':<16}{'reqs':>6}{'ok':>6}{'429':>6}{'503':>6}{'errs':>6}{'tok/s':>9}{'TTFT p50':>10}"
                  f"{'TTFT p95':>10}{'E2E p50':>10}{'E2E p95':>10}"]
        for name, t in s["tenants"].items():
            lines.append(f"{name[:15]:<16}{t['requests']:>6}{t['ok']:>6}{t['rate_limited']:>6}{t['overloaded']:>6}"
                         f"{t['errors']:>6}{t['output_token_throughput']:>9.1f}{_ms(t['ttft']['p50']):>10}"
                         f"{_ms(t['ttft']['p95']):>10}{_ms(t['e2e']['p50']):>10}{_ms(t['e2e']['p95']):>10}")
    if s.get("server"):
        lines += ["", "server counters (delta over the run):"]
        lines += [f"  {k} {v:g}" for k, v in s["server"].items()]
    return "\n".join(lines)


def plot(data: dict, out_dir: Path) -> list[Path]:
    """Latency CDFs and latency over time as PNGs in `out_dir`; [] if matplotlib is missing
    (it is deliberately not a dependency of the project)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in data.get("results", []) if r.get("error") is None and r.get("e2e_s") is not None]
    series = {"TTFT": [r["ttft_s"] for r in ok if r.get("ttft_s") is not None],
              "TPOT": [t for t in map(_tpot, ok) if t is not None],
              "E2E": [r["e2e_s"] for r in ok]}
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs in series.items():
        if xs:
            xs = sorted(x * 1000 for x in xs)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "latency_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    starts = [r["start_s"] for r in ok]
    ax.scatter(starts, [r["e2e_s"] * 1000 for r in ok], s=8, label="E2E")
    with_ttft = [r for r in ok if r.get("ttft_s") is not None]
    ax.scatter([r["start_s"] for r in with_ttft], [r["ttft_s"] * 1000 for r in with_ttft], s=8, label="TTFT")
    ax.set_xlabel("request sent at (s since start)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "latency_over_time.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarize a loadtest/run.py results file.")
    p.add_argument("results", type=Path)
    p.add_argument("--plots", type=Path, help="write PNG plots here (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    data = json.loads(args.results.read_text())
    summary = summarize(data)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    if args.plots:
        written = plot(data, args.plots)
        print(f"plots: {', '.join(map(str, written))}" if written else "plots: skipped (matplotlib not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
