"""`--engine-process on`: the engine core in its own process, the HTTP server talking to it over
ZeroMQ. A real server in that mode, through the openai client and httpx: generation as the
engine computes it in-process, chat streaming, an abort on disconnect that frees the sequence,
admin adapter load/unload, a tenants reload, engine metrics on /metrics, the core's death
answered with 503s (never a hang), and a shutdown that leaves no process behind. The text level
is in tests/test_engine_process_text.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

# the fixtures `roots`, `tenants`, `server` and `client` come from there
from engine_process_servers import (ALPHA, BASE, GAMMA, admin, alive, client, core_pid,  # noqa: F401
                                    roots, server, start, tenants, tenants_toml, wait_for)
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, SamplingParams


def test_the_engine_runs_in_another_process(server):
    pid = core_pid(server)
    assert pid != server.proc.pid and alive(pid)
    assert int(Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1]) == server.proc.pid  # its child


def test_greedy_completion_is_what_the_engine_computes_in_process(server, client, tiny_llama_dir):
    prompts = [[5, 9, 13, 2, 7], [30, 31, 32]]
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.model.num_threads = "float32", "cpu", 1
    cfg.cache.kv_cache_memory = 8 << 20
    cfg.lora.adapters_dir = ""
    engine = LLMEngine(cfg, tiny_llama_dir)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, params))
    texts = {f"r{i}": "" for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
    r = client.completions.create(model=BASE, prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    got = {c.index: c.text for c in r.choices}
    assert [got[0], got[1]] == [texts["r0"], texts["r1"]]
    assert r.usage.completion_tokens == 24


def test_chat_streaming_gives_the_same_text_as_the_whole_answer(client):
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=BASE, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=BASE, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_client_disconnect_aborts_and_frees_the_sequence(server, client):
    aborted = server.metric("loramux_requests_total", 'finish_reason="abort"')
    body = {"model": BASE, "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {ALPHA}"}) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(4))
        assert server.metric("loramux_kv_blocks_used") > 0  # its KV blocks, held in the core
    assert wait_for(lambda: server.metric("loramux_requests_total", 'finish_reason="abort"') == aborted + 1)
    assert wait_for(lambda: server.metric("loramux_kv_blocks_used") == 0
                    and server.metric("vllm:num_requests_running") == 0)
    assert client.completions.create(model=BASE, prompt="still there?", max_tokens=3).choices[0].text is not None


def test_admin_load_serve_and_unload_an_adapter(server, client, roots):
    before = client.completions.create(model=BASE, prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    r = admin(server, "/v1/load_lora_adapter", lora_name="qv", lora_path=str(roots / "qv"))
    assert r.status_code == 200, r.text
    assert "qv" in [m.id for m in client.models.list().data]  # the server's replica knows it at once
    again = admin(server, "/v1/load_lora_adapter", lora_name="qv", lora_path=str(roots / "qv"))
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"  # the core's refusal
    with_adapter = client.completions.create(model="qv", prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    assert with_adapter != before  # the adapter's delta reached the core's forward
    assert server.metric("loramux_requests_total", 'adapter="qv"') >= 1
    r = admin(server, "/v1/unload_lora_adapter", lora_name="qv")
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv", prompt=[5, 6, 7], max_tokens=2)
    assert admin(server, "/v1/unload_lora_adapter", lora_name="qv").status_code == 404


def test_tenants_reload_reaches_the_engine(server, tenants):
    gamma = openai.OpenAI(base_url=server.base_url + "/v1", api_key=GAMMA, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        gamma.completions.create(model=BASE, prompt="hi", max_tokens=2)
    tenants.write_text(tenants_toml(gamma=True))
    r = admin(server, "/v1/admin/reload_tenants")
    assert r.status_code == 200, r.text
    gamma.completions.create(model=BASE, prompt="hi", max_tokens=2)
    # The finish is counted in the core, under the tenant the reload added.
    assert server.metric("loramux_tenant_requests_total", 'status="length",tenant="gamma"') == 1


def test_metrics_show_the_engine_series_once(server, client):
    client.completions.create(model=BASE, prompt="count me", max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert server.metric("loramux_generation_tokens_total") >= 4
    assert server.metric("loramux_kv_blocks_total") > 0
    assert server.metric("loramux_step_seconds_count") > 0
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"}' in text
    # One HELP line per family: the two processes' series are merged, not concatenated.
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))
    # A refusal counted by the server process and one counted by the core, side by side.
    httpx.post(server.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"},
               headers={"Authorization": f"Bearer {ALPHA}"}, timeout=10)
    assert server.metric("loramux_http_errors_total", 'code="model_not_found"') >= 1


def test_a_sighup_reloads_tenants_in_the_server_and_leaves_the_core_running(server, client):
    """SIGHUP is the server's (a tenants reload); sent to the core too (a process group's hangup),
    it must not kill it, as its default action would."""
    pid = core_pid(server)
    os.kill(pid, signal.SIGHUP)
    os.kill(server.proc.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert alive(pid)
    assert client.completions.create(model=BASE, prompt="still here", max_tokens=2).choices[0].text is not None


def test_core_death_gives_503_not_a_hang_and_shutdown_leaves_no_process(tiny_llama_dir, tmp_path, tenants, roots):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "dying.log")
    try:
        pid = core_pid(srv)
        body = {"model": BASE, "prompt": "long", "max_tokens": 400, "stream": True, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {ALPHA}"}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=30, headers=headers) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)  # the stream ends (with an error event), it does not hang
        assert any('"engine_unavailable"' in line for line in rest), rest[-3:]
        assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=5).status_code == 503)
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2},
                       headers=headers, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(srv.base_url + "/metrics", timeout=10).status_code == 200
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


def test_graceful_shutdown_stops_the_core(tiny_llama_dir, tmp_path, tenants, roots):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "stopping.log")
    pid = core_pid(srv)
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)
        client.completions.create(model=BASE, prompt="bye", max_tokens=2)
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    assert wait_for(lambda: not alive(pid), timeout=10), "the engine core outlived the server"
    import tempfile

    assert not list(Path(tempfile.gettempdir()).glob(f"loramux-ipc-{srv.proc.pid}-*"))  # its sockets' directory


def test_metrics_of_two_processes_merge_into_one_exposition():
    """/metrics with the engine in its own process: each family once, a series written in either
    process keeps its value, one written in both (tenant outcomes) is their sum."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics, exposition

    server_side, core = Metrics(), Metrics()
    server_side.set_tenants(["alpha"])
    core.set_tenants(["alpha"])
    server_side.tenant_requests.labels("alpha", "rate_limited").inc(2)  # a refusal: counted by the server
    core.on_finish("alpha", "", "stop", 5, 0.4, 0.1)  # a finish: counted by the core
    core.on_generated({"alpha": 7})
    core.configure_engine("m", 16, 100, 4)
    text = exposition(server_side.registry, core.registry.collect()).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))

    def sample(family: str, name: str, **labels) -> float:
        return sum(s.value for s in fams[family].samples if s.name == name and s.labels == labels)

    outcomes = "loramux_tenant_requests"
    assert sample(outcomes, outcomes + "_total", tenant="alpha", status="rate_limited") == 2
    assert sample(outcomes, outcomes + "_total", tenant="alpha", status="stop") == 1
    assert sample("loramux_generation_tokens", "loramux_generation_tokens_total") == 7
    assert sample("loramux_kv_blocks_total", "loramux_kv_blocks_total") == 100
    assert sample("loramux_e2e_request_latency_seconds", "loramux_e2e_request_latency_seconds_count",
                  adapter="") == 1
