"""The engine core process frozen or dead, as HTTP clients and probes see it: a core that stops
answering (SIGSTOP here; a swap storm or a wedged interpreter in production) turns /health and
/ready to 503 and new work to fast 503s instead of hangs, and serving resumes, with nothing lost,
when it answers again; a dead core gives 503 `engine_unavailable` on every route that needs it
(admin ones included), never a 500."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from engine_process_servers import ADMIN, ALPHA, BASE, alive, core_pid, roots, start, tenants, wait_for  # noqa: F401

# The server's silence limit (default 10 s), short here so that a frozen core shows in seconds.
HEARTBEAT_TIMEOUT_S = 3.0
SHORT_HEARTBEAT = ("--engine-heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))

AUTH = {"Authorization": f"Bearer {ALPHA}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _completion(srv, timeout: float, **extra) -> httpx.Response:
    body = {"model": BASE, "prompt": "hello", "max_tokens": 4, **extra}
    return httpx.post(srv.base_url + "/v1/completions", json=body, headers=AUTH, timeout=timeout)


def test_a_frozen_core_is_503_fast_and_serving_resumes_when_it_thaws(tiny_llama_dir, tmp_path, tenants, roots):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "frozen.log", "on", *SHORT_HEARTBEAT)
    pid = core_pid(srv)
    try:
        assert _completion(srv, 60).status_code == 200
        # A stream in flight when the core freezes: it must finish once the core thaws.
        streamed: list[tuple[float, str]] = []  # (when, SSE line)
        started = threading.Event()

        def stream() -> None:
            body = {"model": BASE, "prompt": "in flight", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        streamed.append((time.monotonic(), line))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            # Probes see it within the heartbeat timeout, and nothing hangs meanwhile.
            assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=2).status_code == 503,
                            timeout=HEARTBEAT_TIMEOUT_S + 10)
            assert time.monotonic() - frozen_at < HEARTBEAT_TIMEOUT_S + 5
            ready = httpx.get(srv.base_url + "/ready", timeout=2)
            assert ready.status_code == 503 and ready.json()["status"] == "engine_down"
            r = _completion(srv, 5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
            assert httpx.get(srv.base_url + "/metrics", timeout=5).status_code == 200
            assert httpx.get(srv.base_url + "/v1/models", headers=AUTH, timeout=5).status_code == 200
        finally:
            os.kill(pid, signal.SIGCONT)
            thawed_at = time.monotonic()
        assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=2).status_code == 200, timeout=15)
        assert httpx.get(srv.base_url + "/ready", timeout=2).status_code == 200
        assert _completion(srv, 60).status_code == 200
        reader.join(120)
        lines = [line for _, line in streamed]
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2], lines[-3:]
        assert streamed[-1][0] > thawed_at, "the stream ended before the freeze: it tested nothing"
    finally:
        os.kill(pid, signal.SIGCONT)
        srv.stop()
    assert srv.proc.returncode == 0


@pytest.mark.parametrize("route", ["load", "pin", "upload"])
def test_adapter_routes_of_a_dead_core_are_503_not_500(tiny_llama_dir, tmp_path, tenants, roots, route):
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "dead.log")
    try:
        os.kill(core_pid(srv), signal.SIGKILL)
        assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=5).status_code == 503)
        if route == "load":
            r = httpx.post(srv.base_url + "/v1/load_lora_adapter", headers=ADMIN_AUTH, timeout=10,
                           json={"lora_name": "late", "lora_path": str(roots / "qv")})
        elif route == "pin":
            r = httpx.post(srv.base_url + "/v1/adapters/late/pin", headers=ADMIN_AUTH, timeout=10)
        else:
            files = {name: (name, (roots / "qv" / name).read_bytes())
                     for name in ("adapter_config.json", "adapter_model.safetensors")}
            r = httpx.post(srv.base_url + "/v1/adapters", headers=AUTH, data={"name": "late"}, files=files,
                           timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_a_shutdown_with_a_frozen_core_ends_the_streams_with_an_error_and_exits(tiny_llama_dir, tmp_path, tenants,
                                                                              roots):
    """SIGTERM while the core is frozen: the drain cannot finish the streams, and the core cannot
    answer the abort; each stream still ends with the error event (not a cut connection), and
    the server stops the frozen core and exits 0 without waiting on it."""
    srv = start(tiny_llama_dir, tmp_path, tenants, roots, "frozen-shutdown.log", "on", "--shutdown-timeout", "1",
                *SHORT_HEARTBEAT)
    pid = core_pid(srv)
    lines: list[str] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": BASE, "prompt": "in flight", "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(pid, signal.SIGSTOP)
        assert wait_for(lambda: httpx.get(srv.base_url + "/health", timeout=2).status_code == 503,
                        timeout=HEARTBEAT_TIMEOUT_S + 10)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert not errors, errors
        assert '"engine_unavailable"' in lines[-1], lines[-3:]
        assert srv.proc.wait(30) == 0, srv.log()
        assert time.monotonic() - signalled < 10, "the server waited on its frozen core"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
        srv.stop()
