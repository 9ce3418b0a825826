"""Fairness run: tenants with unequal offered load against one server; per-tenant service over time.

Each tenant runs `concurrency` closed-loop clients (a new request as soon as one finishes), all
sending /v1/completions with a fixed prompt length, `max_tokens` and `ignore_eos`, so every
request costs the same. Service is measured on the client side, as the VTC paper defines it:
    W = w_p * prompt tokens + w_q * output tokens
from each response's `usage`, counted when the response arrives. Responses are not streamed:
one message per request keeps the client cheap, so that it never lags behind a fast server and
every tenant really keeps its requests outstanding (backlogged).

    python -m loadtest.fairness --tiny --out docs/fairness.svg     # starts a vtc and an fcfs server

writes the plot (per-tenant output tokens/s over time, one panel per policy) and a JSON file of
the runs next to it. The test tests/test_fairness.py drives the same `offer` against real servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python loadtest/fairness.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from loadtest.run import check_local_url


@dataclass(frozen=True)
class TenantLoad:
    name: str
    key: str
    concurrency: int  # closed-loop clients


@dataclass
class Trace:
    """Each finished request, as (seconds since the start, tenant, prompt tokens, output tokens)."""

    events: list[tuple[float, str, int, int]] = field(default_factory=list)
    duration_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # finished requests per tenant
    at_cut: Any = None  # what `at_cut` returned, taken before the clients disconnected

    def service(self, tenant: str, w_p: float, w_q: float, t1: float = 0.0, t2: float = float("inf")) -> float:
        return sum(w_p * p + w_q * o for t, who, p, o in self.events if who == tenant and t1 <= t < t2)

    def tokens_per_second(self, tenant: str, bucket_s: float) -> list[float]:
        """Output tokens per second of `tenant`, in consecutive buckets of `bucket_s` seconds."""
        n = max(1, int(self.duration_s // bucket_s))
        out = [0.0] * n
        for t, who, _p, o in self.events:
            if who == tenant and t < n * bucket_s:
                out[int(t // bucket_s)] += o / bucket_s
        return out


async def offer(base_url: str, model: str, loads: list[TenantLoad], *, prompt_len: int, max_tokens: int,
                max_duration_s: float, stop_at_service: float | None = None, w_p: float = 1.0, w_q: float = 2.0,
                seed: int = 0, at_cut: Callable[[], Any] | None = None) -> Trace:
    """Run every tenant's clients until `max_duration_s`, or until the tenants together were served
    `stop_at_service` (weighted tokens); then disconnect them all (the server aborts what is left).
    `at_cut` (blocking, run in a thread) is called at that cut while every client still keeps its
    request outstanding (they go on sending until it returns), i.e. while the tenants are still
    backlogged: the disconnects that follow abort one tenant's queue before the other's, so server
    state read after them is not."""
    base_url = check_local_url(base_url)
    rng = random.Random(seed)
    trace = Trace(requests={t.name: 0 for t in loads})
    cut = asyncio.Event()  # the run is over: budget served or time up
    done = asyncio.Event()  # the clients stop: set only once `at_cut` has returned
    served = 0.0
    start = time.monotonic()

    async def client(http: httpx.AsyncClient, load: TenantLoad) -> None:
        nonlocal served
        while not done.is_set():
            body = {"model": model, "prompt": [rng.randrange(2, 256) for _ in range(prompt_len)],
                    "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            resp = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {load.key}"})
            if resp.status_code != 200:
                trace.errors.append(f"{load.name}: HTTP {resp.status_code} {resp.text[:200]!r}")
                await asyncio.sleep(0.2)
                continue
            usage = resp.json()["usage"]
            p, o = usage["prompt_tokens"], usage["completion_tokens"]
            if o != max_tokens:  # ignore_eos: anything else is a server fault, not a share of service
                trace.errors.append(f"{load.name}: {o} tokens came back, not {max_tokens}")
            trace.events.append((time.monotonic() - start, load.name, p, o))
            trace.requests[load.name] += 1
            served += w_p * p + w_q * o
            if stop_at_service is not None and served >= stop_at_service:
                cut.set()

    total = sum(t.concurrency for t in loads)
    limits = httpx.Limits(max_connections=total + 4, max_keepalive_connections=total + 4)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(120.0),
                                 trust_env=False) as http:
        # Interleave the tenants' first requests, so arrival order favours nobody.
        order = [t for i in range(max(t.concurrency for t in loads)) for t in loads if i < t.concurrency]
        tasks = [asyncio.create_task(client(http, t)) for t in order]
        try:
            await asyncio.wait_for(cut.wait(), max_duration_s)
        except TimeoutError:
            pass
        trace.duration_s = time.monotonic() - start
        if at_cut is not None:
            trace.at_cut = await asyncio.to_thread(at_cut)
        done.set()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    trace.errors += [repr(r) for r in results
                     if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    return trace


# --- the plot ------------------------------------------------------------------------------

COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def svg_plot(panels: list[tuple[str, Trace]], tenants: list[str], bucket_s: float) -> str:
    """Per-tenant output tokens/s over time, one panel per (title, trace), as a standalone SVG."""
    width, panel_h, left, top, gap = 720, 220, 60, 30, 50
    plot_w, plot_h = width - left - 20, panel_h - 50
    series = {title: {t: trace.tokens_per_second(t, bucket_s) for t in tenants} for title, trace in panels}
    y_max = max([v for s in series.values() for ys in s.values() for v in ys] + [1.0]) * 1.1
    x_max = max(trace.duration_s for _, trace in panels)
    height = top + len(panels) * (panel_h + gap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for p, (title, trace) in enumerate(panels):
        y0 = top + p * (panel_h + gap)
        out.append(f'<text x="{left}" y="{y0 - 8}" font-size="13" font-weight="bold">{title}</text>')
        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>')
        for k in range(5):  # y grid and labels
            v = y_max * k / 4
            y = y0 + plot_h - plot_h * k / 4
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        for k in range(6):  # x labels
            t = x_max * k / 5
            x = left + plot_w * k / 5
            out.append(f'<text x="{x:.1f}" y="{y0 + plot_h + 16}" text-anchor="middle">{t:.0f}s</text>')
        out.append(f'<text x="14" y="{y0 + plot_h / 2}" transform="rotate(-90 14 {y0 + plot_h / 2})" '
                   f'text-anchor="middle">output tokens/s</text>')
        for i, tenant in enumerate(tenants):
            ys = series[title][tenant]
            pts = " ".join(f"{left + plot_w * (j + 0.5) * bucket_s / x_max:.1f},{y0 + plot_h - plot_h * v / y_max:.1f}"
                           for j, v in enumerate(ys))
            color = COLORS[i % len(COLORS)]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
            lx = left + 10 + 200 * i
            out.append(f'<rect x="{lx}" y="{y0 + 8}" width="12" height="12" fill="{color}"/>')
            out.append(f'<text x="{lx + 16}" y="{y0 + 18}">{tenant}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- the command ---------------------------------------------------------------------------

def tenants_file(path: Path, loads: list[TenantLoad]) -> Path:
    """A tenants file for `loads`: equal weights, limits far above the offered load."""
    from server.tenants import hash_key

    path.write_text("".join(f'[tenants.{t.name}]\nkeys = ["{hash_key(t.key)}"]\nweight = 1.0\n'
                            f"max_concurrent = 1000\nmax_queued = 1000\n\n" for t in loads))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory to serve")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama (tests/conftest.py), built in a temp dir")
    ap.add_argument("--heavy", type=int, default=100, help="concurrent clients of tenant `heavy`")
    ap.add_argument("--light", type=int, default=10, help="concurrent clients of tenant `light`")
    ap.add_argument("--max-num-seqs", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per policy")
    ap.add_argument("--bucket", type=float, default=2.0, help="seconds per plotted point")
    ap.add_argument("--out", type=Path, default=Path("docs/fairness.svg"))
    args = ap.parse_args(argv)

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from server_process import ServerProcess  # the launcher the tests use

    loads = [TenantLoad("heavy", "sk-heavy-fairness", args.heavy), TenantLoad("light", "sk-light-fairness", args.light)]
    panels, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.tiny:
            from conftest import save_tiny_model

            model_dir = save_tiny_model(tmp_path / "tiny", "llama")
        else:
            model_dir = Path(args.model)
        tfile = tenants_file(tmp_path / "tenants.toml", loads)
        for policy in ("vtc", "fcfs"):
            srv = ServerProcess(["--model", str(model_dir), "--served-model-name", "m", "--dtype", "float32",
                                 "--num-threads", "1", "--kv-cache-memory", "64MiB", "--no-lora",
                                 "--tenants", str(tfile), "--scheduling", policy,
                                 "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", "1000"], tmp_path / f"{policy}.log")
            try:
                trace = asyncio.run(offer(srv.base_url, "m", loads, prompt_len=args.prompt_len,
                                          max_tokens=args.max_tokens, max_duration_s=args.duration))
            finally:
                srv.stop()
            w = {t.name: trace.service(t.name, 1.0, 2.0) for t in loads}
            summary[policy] = {"service": w, "requests": trace.requests, "duration_s": trace.duration_s,
                               "errors": trace.errors[:5],
                               "tokens_per_second": {t.name: trace.tokens_per_second(t.name, args.bucket)
                                                     for t in loads}}
            share = w["light"] / max(1.0, sum(w.values()))
            print(f"{policy}: weighted service {w}, light's share {share:.2f}, errors {len(trace.errors)}")
            panels.append((f"--scheduling {policy}: heavy {args.heavy} concurrent requests, light {args.light}; "
                           f"light's share of service {share:.0%}", trace))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg_plot(panels, [t.name for t in loads], args.bucket))
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "runs": summary}) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 1 if any(run["errors"] for run in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
