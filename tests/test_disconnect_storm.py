"""A disconnect storm with a poison request against a real server (issue 9, defects 1 and 5).

~50 concurrent clients (completions and chat, streaming and not, base model and two
adapters) through the load generator; 30% of them hang up mid-stream, and one client sends
a seed outside the 64-bit range while the others run. Every other request must complete
in full, the poison must get a 4xx OpenAI error, and once the last client is gone the
server's gauges must read zero again with no further traffic (only GET /metrics).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # loadtest/ is a directory of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from server_process import ServerProcess  # noqa: E402
from test_loadtest import write_lora_adapter  # noqa: E402

from loadtest import report, run, workload  # noqa: E402

NUM_CLIENTS = 50
POISON_SEED = 2**64  # one past the largest unsigned 64-bit value
REGULAR_TOKENS = "uniform:4:24"
# A hanging-up client asks for far more tokens than it reads, so it is still generating when
# it leaves and the server must abort it. Half leave after a few chunks, in the thick of the
# storm; the other half after LATE_CHUNKS chunks: by then every regular request (at most 24
# tokens, all sent at t=0) has long finished, so the last thing the server sees is a
# disconnect, after which no engine step runs: the state in which the gauges went stale.
HANG_UP_TOKENS = 400
EARLY_CHUNKS, LATE_CHUNKS = 3, 90
GAUGES = ("loramux_requests_running", "loramux_requests_waiting", "loramux_kv_blocks_used")
GAUGE_WAIT_S = 30.0  # stale gauges stay stale: a long wait only spares a slow machine


def storm(adapters: tuple[str, ...]) -> list[workload.RequestSpec]:
    """The clients: a reproducible workload, every other one on the chat API, 3 in 10 hanging
    up (alternately early and late), plus the poison."""
    cfg = workload.WorkloadConfig(num_requests=NUM_CLIENTS, adapters=adapters, base_share=0.5, zipf_s=0.0,
                                  stream_share=0.6, prompt_len=workload.LengthDist.parse("uniform:3:12"),
                                  output_len=workload.LengthDist.parse(REGULAR_TOKENS), seed=11)
    specs = []
    for spec in workload.generate(cfg):
        spec = replace(spec, api="chat" if spec.index % 2 else "completions")
        if spec.index % 10 in (1, 4, 7):
            late = spec.index % 20 >= 10
            spec = replace(spec, stream=True, max_tokens=HANG_UP_TOKENS,
                           disconnect_after=LATE_CHUNKS if late else EARLY_CHUNKS)
        specs.append(spec)
    # Sent once the others are streaming. Sampled (temperature > 0), so the seed is used.
    poison = workload.RequestSpec(index=NUM_CLIENTS, arrival_s=0.25, adapter=None, prompt="poison", prompt_words=1,
                                  max_tokens=8, stream=False, temperature=0.8, seed=POISON_SEED)
    return specs + [poison]


def test_disconnects_and_a_poison_request_hurt_no_one_and_leave_no_stale_gauges(tiny_llama_dir, tmp_path):
    store = tmp_path / "adapters"
    for k in range(2):
        write_lora_adapter(store / f"expert-{k}", tiny_llama_dir, seed=k)
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--kv-cache-memory", "32MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--max-loras", "2", "--max-lora-rank", "8"], tmp_path / "server.log")
    try:
        specs = storm(("expert-0", "expert-1"))
        data = asyncio.run(run.run(specs, srv.base_url, duration_s=5.0, drain_s=60.0, timeout_s=60.0))
        gauges, waited = wait_for_idle_gauges(srv)
        abort_total = srv.metric("loramux_requests_total", 'finish_reason="abort"')
        fresh = httpx.post(srv.base_url + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": "still there?", "max_tokens": 5, "ignore_eos": True, "temperature": 0})
    finally:
        srv.stop()
    log = "\n".join(line for line in srv.log_path.read_text().splitlines() if '" 200 OK' not in line)[-3000:]
    results = {r["index"]: r for r in data["results"]}
    assert len(results) == len(specs), data["meta"]
    by_index = {s.index: s for s in specs}
    regular = [s for s in specs[:-1] if s.disconnect_after is None]
    hung_up = [s for s in specs if s.disconnect_after is not None]
    assert len(hung_up) == 0.3 * NUM_CLIENTS and {s.disconnect_after for s in hung_up} == {EARLY_CHUNKS, LATE_CHUNKS}
    assert {s.api for s in regular} == {"chat", "completions"} and {s.stream for s in regular} == {True, False}

    # Every client that stayed got its whole answer, untouched by the poison and the hang-ups.
    broken = {i: (r["error"], r["detail"]) for i, r in results.items()
              if by_index[i].disconnect_after is None and i != NUM_CLIENTS
              and (r["error"] or r["finish_reason"] != "length" or r["completion_tokens"] != by_index[i].max_tokens)}
    assert not broken, f"{len(broken)} of {len(regular)} regular requests failed: {broken}\n{log}"

    # The poison request is refused with an OpenAI error naming the client's mistake.
    poison = results[NUM_CLIENTS]
    assert poison["status"] is not None and 400 <= poison["status"] < 500, (poison, log)
    assert poison["error"].startswith(f"http_{poison['status']}:"), poison
    assert "seed" in poison["detail"], poison

    # Every hang-up left mid-stream, and the server counted each one as an abort.
    assert all(results[s.index]["disconnected"] and results[s.index]["error"] is None for s in hung_up), \
        [results[s.index] for s in hung_up]
    assert report.summarize(data)["disconnected"] == len(hung_up)
    # (Read after the gauge wait: the last aborts reach the engine a moment after the client leaves.)
    assert abort_total == len(hung_up), abort_total

    # Afterwards, with no traffic but /metrics, every gauge is back to zero ...
    assert all(v == 0 for v in gauges.values()), f"after {waited:.1f} s: {gauges}"
    # ... and the server still serves.
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["usage"]["completion_tokens"] == 5


def wait_for_idle_gauges(srv: ServerProcess) -> tuple[dict[str, float], float]:
    """Poll /metrics until every gauge in GAUGES reads 0, for at most GAUGE_WAIT_S seconds;
    (the last readings, seconds waited)."""
    t0 = time.monotonic()
    while True:
        text = srv.scrape()  # one moment for all of them
        gauges = {name: srv.metric(name, text=text) for name in GAUGES}
        waited = time.monotonic() - t0
        if all(v == 0 for v in gauges.values()) or waited > GAUGE_WAIT_S:
            return gauges, waited
        time.sleep(0.2)
