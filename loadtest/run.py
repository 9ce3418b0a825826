"""Drive a workload against a running loramux server's OpenAI API and record every request.

Per request: time to first token (TTFT), the gaps between streamed chunks (inter-token
latencies), end-to-end latency, prompt/completion tokens (from the server's `usage`), and
the error, if any (HTTP status + OpenAI error code, an SSE error event, a timeout, ...).
A request with `disconnect_after` closes its connection after that many text chunks, as a
client that gives up mid-stream; it is counted as disconnected, neither ok nor an error.
The results go to a JSON file that `loadtest/report.py` summarizes (and plots).
With `--tenant NAME=KEY[:WEIGHT]` (repeatable) the traffic is split over tenants by weight and
each request carries its tenant's key; the report then has a per-tenant table (latency, 429s).

Bounded by construction: at most `workload.MAX_REQUESTS` requests; nothing is sent after
`--duration` seconds; whatever is still in flight `--drain` seconds later is cancelled; each
request has its own `--timeout`; the unmeasured `--warmup` requests sent first get 300 s
each (enough for a first-request kernel build). Only a server on this machine can be a
target: the URL must name a loopback address (127.0.0.0/8, ::1, or `localhost` resolving to
loopback only), and no proxy from the environment is used.

    python -m loadtest.run --url http://127.0.0.1:8000 -n 200 --rate 8 --out results.json
    python -m loadtest.run -n 200 --rate 8 --tenant acme=lmx-...:3 --tenant beta=lmx-...:1
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `python loadtest/run.py`: make `loadtest.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from loadtest import report, workload
from loadtest.workload import RequestSpec

# Server-side counters worth a before/after delta next to the client's view.
SERVER_COUNTERS = ("loramux_requests_total", "loramux_generation_tokens_total", "loramux_prompt_tokens_total",
                   "loramux_preemptions_total", "loramux_http_errors_total", "loramux_tenant_requests_total",
                   "loramux_adapter_cache_hits_total", "loramux_adapter_cache_misses_total",
                   "loramux_adapter_loads_total")


class NotLocalError(ValueError):
    """The target is not a loopback address: this tool never sends traffic off the machine."""


def check_local_url(url: str) -> str:
    """The base URL (scheme://host:port, no path) if `url` points at this machine; else raise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLocalError(f"{url!r}: expected http://127.0.0.1:PORT or http://localhost:PORT")
    host = parts.hostname
    if host == "localhost":
        # /etc/hosts could map localhost anywhere: every address it resolves to must be loopback.
        addrs = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_STREAM)}
        if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
            raise NotLocalError(f"localhost resolves to {sorted(addrs)}, not only loopback addresses")
    else:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise NotLocalError(f"{host!r}: only 127.0.0.1, ::1 or localhost are allowed targets") from None
        if not ip.is_loopback:
            raise NotLocalError(f"{host}: not a loopback address; this tool only targets this machine")
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}{f':{parts.port}' if parts.port else ''}"


@dataclass
class Result:
    """What happened to one request. Times are seconds; `start_s` is relative to the run start."""

    index: int
    adapter: str | None
    stream: bool
    scheduled_s: float
    tenant: str | None = None
    start_s: float | None = None
    ttft_s: float | None = None  # streaming only: send -> first chunk carrying text
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    finish_reason: str | None = None
    disconnected: bool = False  # closed the stream on purpose (spec.disconnect_after) before it ended
    status: int | None = None
    error: str | None = None  # None: success; else a short kind, e.g. "http_503:overloaded"
    detail: str | None = None  # the error's message, for the report
    retry_after_s: float | None = None  # a refusal's Retry-After header


def _error(resp_body: bytes) -> tuple[str, str]:
    """(code, message) of an OpenAI error body; ("error", the raw start) if it is not one."""
    try:
        err = json.loads(resp_body)["error"]
        return str(err.get("code") or err.get("type") or "error"), str(err.get("message", ""))[:300]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "error", resp_body[:300].decode("utf-8", "replace")


def _chunk_text(obj: dict) -> str:
    text = ""
    for choice in obj.get("choices") or ():
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


def _finish_reason(obj: dict) -> str | None:
    for choice in obj.get("choices") or ():
        if choice.get("finish_reason"):
            return choice["finish_reason"]
    return None


def _refused(res: Result, resp: httpx.Response, body: bytes) -> None:
    code, res.detail = _error(body)
    res.error = f"http_{resp.status_code}:{code}"
    try:
        res.retry_after_s = float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        pass


async def _send(client: httpx.AsyncClient, spec: RequestSpec, model: str, res: Result, t0: float,
                headers: dict[str, str]) -> None:
    path = "/v1/chat/completions" if spec.api == "chat" else "/v1/completions"
    start = time.perf_counter()
    res.start_s = time.monotonic() - t0
    if not spec.stream:
        resp = await client.post(path, json=spec.body(model), headers=headers)
        res.status = resp.status_code
        if resp.status_code != 200:
            _refused(res, resp, resp.content)
            return
        obj = resp.json()
        res.e2e_s = time.perf_counter() - start
        res.finish_reason = _finish_reason(obj)
        usage = obj.get("usage") or {}
        res.prompt_tokens, res.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return
    async with client.stream("POST", path, json=spec.body(model), headers=headers) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            _refused(res, resp, await resp.aread())
            return
        last = None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                res.e2e_s = time.perf_counter() - start
                return
            obj = json.loads(data)
            if "error" in obj:  # the server's mid-stream failure event
                err = obj["error"] or {}
                res.error, res.detail = f"sse_error:{err.get('code') or 'error'}", str(err.get("message", ""))[:300]
                return
            now = time.perf_counter()
            if obj.get("usage"):
                res.prompt_tokens = obj["usage"].get("prompt_tokens")
                res.completion_tokens = obj["usage"].get("completion_tokens")
            res.finish_reason = _finish_reason(obj) or res.finish_reason
            if not _chunk_text(obj):
                continue  # role-only or usage-only chunks carry no token
            res.chunks += 1
            if last is None:
                res.ttft_s = now - start
            else:
                res.itl_s.append(now - last)
            last = now
            if spec.disconnect_after is not None and res.chunks >= spec.disconnect_after and not res.finish_reason:
                # Leaving the `stream` block with the body unread closes the connection: the
                # server sees the client go away mid-stream.
                res.disconnected = True
                return
        res.error = "stream_ended_without_done"


async def _one(client, spec, model, res, t0, timeout_s, sem, headers) -> None:
    try:
        await asyncio.wait_for(_send(client, spec, model, res, t0, headers), timeout_s)
    except asyncio.TimeoutError:
        res.error = "timeout"
    except asyncio.CancelledError:
        res.error = res.error or "cancelled"  # still in flight at the end of the drain window
        raise
    except httpx.HTTPError as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    except (ValueError, KeyError) as exc:  # a malformed chunk: the server's bug, recorded not fatal
        res.error, res.detail = f"bad_response:{type(exc).__name__}", str(exc)[:300]
    finally:
        if res.error is not None:
            res.e2e_s = None
        if sem is not None:
            sem.release()


async def fetch_models(client: httpx.AsyncClient) -> tuple[str, list[str]]:
    """(base model id, adapter ids) from /v1/models: cards with a `parent` are adapters."""
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    cards = resp.json().get("data") or []
    base = next((c["id"] for c in cards if not c.get("parent")), None)
    if base is None:
        raise RuntimeError("the server lists no base model in /v1/models")
    return base, [c["id"] for c in cards if c.get("parent")]


WARMUP_TIMEOUT_S = 300.0  # a cold machine JIT-builds the C++ attention kernel on the first request


async def warm_up(client: httpx.AsyncClient, model: str, n: int) -> None:
    """`n` short base-model requests, one at a time, before anything is measured: one-time
    costs (the kernel build, first allocations) stay out of the numbers, and a server that
    cannot answer at all fails the run here instead of in every request."""
    for _ in range(n):
        resp = await client.post("/v1/completions", timeout=WARMUP_TIMEOUT_S,
                                 json={"model": model, "prompt": "warm up", "max_tokens": 2, "temperature": 0})
        if resp.status_code != 200:
            code, message = _error(resp.content)
            raise RuntimeError(f"warm-up request failed: HTTP {resp.status_code} {code}: {message}")


async def scrape_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """Sum over labels of each of SERVER_COUNTERS, plus requests by finish_reason; {} if /metrics fails."""
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in SERVER_COUNTERS:
            continue
        value = float(line.rsplit(" ", 1)[1])
        out[name] = out.get(name, 0.0) + value
        for label in ("finish_reason", "status"):
            m = re.search(label + r'="([^"]*)"', line)
            if m:
                tenant = re.search(r'tenant="([^"]*)"', line)
                key = f"{name}{{{label}={m.group(1)}{f',tenant={tenant.group(1)}' if tenant else ''}}}"
                out[key] = out.get(key, 0.0) + value
    return out


async def run(specs: list[RequestSpec], base_url: str, *, base_model: str | None = None,
              max_concurrency: int | None = None, duration_s: float = 60.0, drain_s: float = 30.0,
              timeout_s: float = 120.0, warmup: int = 1, keys: dict[str, str] | None = None,
              api_key: str | None = None) -> dict:
    """Send `specs` on their schedule and return {"meta", "results", "server"} (JSON-ready).
    `keys`: API key per tenant name (every tenant in `specs` needs one); `api_key`: the key of
    requests without a tenant, of the model list and of the warm-up (default: the first tenant's)."""
    keys = keys or {}
    missing = sorted({s.tenant for s in specs if s.tenant is not None} - set(keys))
    if missing:
        raise ValueError(f"no API key for tenant(s) {', '.join(missing)}: give --tenant NAME=KEY")
    api_key = api_key or next(iter(keys.values()), None)
    auth = {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}
    default_auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base_url = check_local_url(base_url)
    if len(specs) > workload.MAX_REQUESTS:
        raise ValueError(f"at most {workload.MAX_REQUESTS} requests")
    conns = max(1, min(max_concurrency or len(specs), 1024))
    # trust_env=False: no proxy from the environment can carry this traffic elsewhere.
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, follow_redirects=False, headers=default_auth,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns)) as client:
        discovered_base, _ = await fetch_models(client)
        model = base_model or discovered_base
        await warm_up(client, model, warmup)
        before = await scrape_counters(client)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        results: list[Result] = []
        tasks = []
        t0 = time.monotonic()
        not_sent = 0
        for i, spec in enumerate(specs):
            if spec.arrival_s >= duration_s:
                not_sent = len(specs) - i
                break
            delay = spec.arrival_s - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is not None:
                try:  # closed loop: wait for a free slot, but never past the deadline
                    await asyncio.wait_for(sem.acquire(), max(0.0, duration_s - (time.monotonic() - t0)))
                except asyncio.TimeoutError:
                    not_sent = len(specs) - i
                    break
            res = Result(spec.index, spec.adapter, spec.stream, spec.arrival_s, tenant=spec.tenant)
            results.append(res)
            tasks.append(asyncio.create_task(_one(client, spec, spec.adapter or model, res, t0, timeout_s, sem,
                                                  auth.get(spec.tenant, default_auth))))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, duration_s + drain_s - (time.monotonic() - t0)))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for res in results:  # a task cancelled before it ever ran recorded nothing
            if res.error is None and res.e2e_s is None and not res.disconnected:
                res.error = "cancelled"
        wall = time.monotonic() - t0
        after = await scrape_counters(client)
    results.sort(key=lambda r: r.index)
    return {
        "meta": {"base_url": base_url, "base_model": model, "num_requests": len(specs), "sent": len(results),
                 "not_sent": not_sent, "max_concurrency": max_concurrency, "duration_limit_s": duration_s,
                 "drain_s": drain_s, "timeout_s": timeout_s, "warmup": warmup, "wall_s": wall},
        "results": [asdict(r) for r in results],
        "server": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))},
    }


async def _resolve_adapters(base_url: str, text: str, api_key: str | None) -> tuple[str, ...]:
    if text.strip().lower() != "auto":
        return workload.split_names(text)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=10.0, headers=headers) as client:
        return tuple((await fetch_models(client))[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Load-test a local loramux server (loopback targets only).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--model", help="the base model id (default: the one /v1/models lists)")
    p.add_argument("--api-key", help="key of requests without a tenant, the model list and the warm-up "
                                     "(default: the first --tenant's key)")
    p.add_argument("--workload", type=Path, help="a JSONL workload from loadtest/workload.py (overrides the flags)")
    workload.add_arguments(p)
    p.set_defaults(adapters="auto")  # whatever adapters the server lists; none: base only
    g = p.add_argument_group("run bounds")
    g.add_argument("--max-concurrency", type=int, help="requests in flight at most (with --rate inf: a closed loop)")
    g.add_argument("--duration", type=float, default=60.0, help="send nothing after this many seconds")
    g.add_argument("--drain", type=float, default=30.0, help="then wait this long for requests in flight")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request limit in seconds")
    g.add_argument("--warmup", type=int, default=1, choices=range(0, 11), metavar="{0..10}",
                   help="unmeasured base-model requests sent first (absorb the kernel build, first allocations)")
    p.add_argument("--out", type=Path, help="write the per-request results (JSON) here")
    p.add_argument("--plots", type=Path, help="also write plots here (needs matplotlib)")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    args = p.parse_args(argv)
    for name in ("duration", "drain", "timeout"):
        if not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name} must be a positive number of seconds")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    try:
        base_url = check_local_url(args.url)
    except NotLocalError as exc:
        print(f"loadtest: refusing to run: {exc}", file=sys.stderr)
        return 2
    keys = {t.name: t.key for t in args.tenants if t.key}
    if len(keys) != len(args.tenants):
        p.error("--tenant needs NAME=KEY[:WEIGHT] here")
    api_key = args.api_key or next(iter(keys.values()), None)
    try:
        if args.workload:
            specs = workload.load(args.workload)
        else:
            adapters = asyncio.run(_resolve_adapters(base_url, args.adapters, api_key))
            specs = workload.generate(workload.config_from_args(args, adapters))
    except (ValueError, OSError, httpx.HTTPError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(workload.describe(specs), flush=True)
    try:
        data = asyncio.run(run(specs, base_url, base_model=args.model, max_concurrency=args.max_concurrency,
                               duration_s=args.duration, drain_s=args.drain, timeout_s=args.timeout,
                               warmup=args.warmup, keys=keys, api_key=api_key))
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:  # no server there, or no base model listed
        print(f"loadtest: cannot run against {base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    summary = report.summarize(data)
    print(report.format_summary(summary))
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
        print(f"results: {args.out}")
    if args.plots:
        written = report.plot(data, args.plots)
        print(f"plots: {', '.join(map(str, written))}" if written else "plots: skipped (matplotlib not installed)")
    return 1 if args.fail_on_error and summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
