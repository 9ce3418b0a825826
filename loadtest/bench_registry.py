"""Start-up time and memory against the number of registered adapters (issue 11, item 4).

Builds two adapter stores (10 and 10,000 adapters by default, random rank-16 q/v adapters of the
model, hard-linked so the disk cost is `--distinct` files), starts the server on each, and
prints the seconds until /health answers and the server's resident memory (VmRSS of the server
and its engine core process) then, and after one /v1/models listing; then the CPU seconds the
idle server spends per second (its registry replica refreshes once a second: that cost must not
grow with adapters registered); then the ratios. A benchmark, not a test: numbers vary with the
machine's load.

    python -m loadtest.bench_registry --model ~/.cache/loramux/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.procstat import cpu_s, rss_mib
from loadtest.random_adapters import make_store
from server.model.default_model import default_model_dir

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: Path, store: Path, log: Path, timeout: float = 600.0, idle_s: float = 10.0) -> dict:
    port = _free_port()
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), "--model", str(model), "--num-threads", "1", "--adapters-dir", str(store),
                                 "--max-lora-rank", "16"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server not healthy in {timeout}s; see {log}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        start_s = time.monotonic() - t0
        rss = rss_mib(proc.pid)
        t1 = time.monotonic()
        listed = len(httpx.get(url + "/v1/models", timeout=120).json()["data"])
        list_s = time.monotonic() - t1
        rss_listed = rss_mib(proc.pid)
        c0, t2 = cpu_s(proc.pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = (cpu_s(proc.pid) - c0) / (time.monotonic() - t2)
        return {"start_s": start_s, "rss_mib": rss, "list_s": list_s, "listed": listed,
                "rss_after_list_mib": rss_listed, "idle_cpu": idle_cpu}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--counts", type=int, nargs="+", default=[10, 10_000])
    p.add_argument("--distinct", type=int, default=8, help="adapters with their own files; the rest hard-link them")
    args = p.parse_args(argv)
    model = args.model or default_model_dir()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        for n in args.counts:
            store = Path(tmp) / f"store-{n}"
            t = time.monotonic()
            make_store(model, store, n, rank=16, distinct=min(args.distinct, n))
            made = time.monotonic() - t
            rows[n] = measure(model, store, Path(tmp) / f"server-{n}.log")
            r = rows[n]
            print(f"{n:>6} adapters (store made in {made:.1f}s): start {r['start_s']:.2f} s, RSS {r['rss_mib']:.0f} MiB; "
                  f"/v1/models lists {r['listed']} in {r['list_s'] * 1000:.0f} ms, RSS then {r['rss_after_list_mib']:.0f} MiB; "
                  f"idle: {r['idle_cpu']:.3f} CPU s/s", flush=True)
    lo, hi = min(rows), max(rows)
    a, b = rows[lo], rows[hi]
    print(f"{hi} vs {lo}: start {b['start_s'] / a['start_s']:.2f}x ({b['start_s'] - a['start_s']:+.2f} s), "
          f"RSS {b['rss_mib'] / a['rss_mib']:.2f}x ({b['rss_mib'] - a['rss_mib']:+.0f} MiB); "
          f"after listing {b['rss_after_list_mib'] - a['rss_after_list_mib']:+.0f} MiB; "
          f"idle CPU {b['idle_cpu']:.3f} vs {a['idle_cpu']:.3f} s/s")
    print(f"cpu: {os.cpu_count()} cores; avx512_bf16/amx: "
          f"{any(f in Path('/proc/cpuinfo').read_text() for f in ('avx512_bf16', 'amx_tile'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
