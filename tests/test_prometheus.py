"""A real Prometheus (Debian's `prometheus`, installed by deploy/prometheus/install.sh, which
`make test` runs) scrapes a real server every second while two tenants send traffic; then every
query of the Grafana dashboard must return data through Prometheus' HTTP API, and the `vllm:`
series the Gateway API Inference Extension reads must be there with their labels."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from peft_adapters import make_peft_adapter
from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "loramux.json"
BASE = "tiny"
TENANTS = {"key-alpha": "alpha", "key-beta": "beta"}
# Grafana's variables, as "All" and a rate window that holds the whole run.
VARIABLES = {"$__rate_interval": "2m", "$instance": ".*", "$adapter": ".*", "$tenant": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, variables substituted.
    A variable's `label_values(selector, label)` becomes `count by (label) (selector)`."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            out.extend((f"panel {p['title']!r} {t['refId']}", t["expr"]) for t in p.get("targets", []))
            walk(p.get("panels") or [])

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"].strip())
            assert m, v["query"]
            out.append((f"variable {v['name']!r}", f"count by ({m.group(2)}) ({m.group(1)})"))
    for name, replacement in VARIABLES.items():
        out = [(where, expr.replace(name, replacement)) for where, expr in out]
    return out


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus is not installed: run deploy/prometheus/install.sh (as root; `make test` does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI must run this test, never skip it
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for seed, name in enumerate(("a1", "a2"), start=1):
        make_peft_adapter(tiny_llama_dir, store / name, seed=seed, target_modules=["q_proj", "v_proj"], r=4,
                          lora_alpha=4)
    # One device slot and one host slot: alternating adapters evict on both tiers.
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-loras", "1", "--max-cpu-loras", "1",
                         "--api-keys", *[f"{k}={t}" for k, t in TENANTS.items()]],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, server, tmp_path_factory):
    """Prometheus on a free port, scraping `server` every second, its data in a temp dir."""
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: loramux\n    scrape_timeout: 900ms\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n")
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.3)
        # Ready is not scraping: targets are applied a few seconds later. Traffic before the
        # first scrape would show as no increase at all.
        while not [s for s in query(url, "up") if s["value"][1] == "1"]:
            assert time.monotonic() < deadline, "prometheus did not scrape the server"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=30)
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def send_traffic(server) -> dict[str, int]:
    """Both tenants, the base and both adapters (alternating: loads and evictions), and a 404.
    Returns the completion tokens each tenant got, as the API reported them."""
    generated = dict.fromkeys(TENANTS.values(), 0)
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        for _ in range(3):
            for key, model in (("key-alpha", BASE), ("key-alpha", "a1"), ("key-beta", "a2"), ("key-beta", BASE)):
                r = c.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": model, "prompt": "hello", "max_tokens": 8, "ignore_eos": True})
                assert r.status_code == 200, r.text
                generated[TENANTS[key]] += r.json()["usage"]["completion_tokens"]
            time.sleep(1)  # spread over several scrapes
        r = c.post("/v1/completions", headers={"Authorization": "Bearer key-beta"},
                   json={"model": "no-such-adapter", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 404
    return generated


def wait_for_scrapes_after(prometheus: str, t: float, n: int = 3, timeout: float = 60.0) -> None:
    """Wait until Prometheus holds `n` successful scrapes of the server that began after `t`
    (Unix seconds), so that a series first written by the last request has samples to rate.
    A scrape's samples are committed before its `up` sample. How soon that is depends on the
    machine (a scrape may be late or time out under load): poll, do not sleep."""
    deadline = time.monotonic() + timeout
    while True:
        samples = [(float(ts), v) for series in query(prometheus, "up[2m]") for ts, v in series["values"]]
        if sum(ts > t and v == "1" for ts, v in samples) >= n:
            return
        assert time.monotonic() < deadline, f"fewer than {n} successful scrapes after the traffic: {samples[-5:]}"
        time.sleep(0.3)


def test_every_dashboard_query_returns_data(server, prometheus):
    generated = send_traffic(server)
    wait_for_scrapes_after(prometheus, time.time())

    empty, no_number = [], []
    for where, expr in dashboard_queries():
        result = query(prometheus, expr)
        if not result:
            empty.append(f"{where}: {expr}")
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            no_number.append(f"{where}: {expr} -> {result}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert not no_number, "queries with only NaN/Inf:\n" + "\n".join(no_number)

    # Per-tenant panels show both tenants.
    tokens = query(prometheus, "sum by (tenant) (loramux_tenant_generation_tokens_total)")
    assert {s["metric"]["tenant"]: float(s["value"][1]) for s in tokens} == generated


def test_the_extension_reads_the_vllm_series_through_prometheus(server, prometheus):
    """The series the endpoint picker reads, as stored by a real Prometheus (names with ':')."""
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        result = query(prometheus, name)
        assert len(result) == 1, (name, result)
        assert result[0]["metric"]["model_name"] == BASE and result[0]["metric"]["engine"] == "0"
    # Idle, the adapter lists are empty, and Prometheus stores an empty label as no label; the
    # endpoint picker scrapes pods itself and sees them (test_metrics.py checks the exposition).
    info = query(prometheus, "vllm:lora_requests_info")
    assert len(info) == 1 and info[0]["metric"]["max_lora"] == "1", info
    assert abs(float(info[0]["value"][1]) - time.time()) < 120  # the time of the last update, as vLLM
