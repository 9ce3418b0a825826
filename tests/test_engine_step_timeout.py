"""An engine-loop step that runs past --engine-step-timeout while the core process lives (its
heartbeat thread beats on): the server counts the engine as hung, as it does a silent core
(/health and /ready 503, new requests a fast 503 `engine_unavailable`, an error log naming the
step's age), and serves again once the step completes. Before, a core whose loop was stuck in a
step kept beating: requests hung and the probes said 200.

The step is real, with no hook in the engine: a 14,000-token prefill of a tiny random model
(seconds on one CPU thread) under a 1 s limit. Seen from the server, a step that never returns
and one that runs past the limit are the same until it returns; this one returns, which tests
the recovery too. Waiting for work is never a step: an idle server stays up however long."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from conftest import save_tiny_model
from engine_process_servers import core_pid
from server_process import ServerProcess

PROMPT = [5 + i % 300 for i in range(14000)]
LIMIT_S = 1.0


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("long-context"), "llama", max_position_embeddings=16384)


def test_the_step_timeout_is_a_setting():
    from server.cli import build_config, make_parser
    from server.config import Config

    def parse(*flags: str) -> Config:
        return build_config(make_parser().parse_args(["serve", *flags]))

    assert parse().server.engine_step_timeout == 300.0 and parse().server.engine_heartbeat_timeout == 10.0
    cfg = parse("--engine-step-timeout", "0", "--engine-heartbeat-timeout", "2.5")
    assert cfg.server.engine_step_timeout == 0 and cfg.server.engine_heartbeat_timeout == 2.5
    for flag, value in (("--engine-step-timeout", "-1"), ("--engine-heartbeat-timeout", "0"),
                        ("--engine-heartbeat-timeout", "0.2"), ("--engine-heartbeat-timeout", "nan")):
        with pytest.raises(ValueError, match=flag.lstrip("-")):
            parse(flag, value)


def _complete(srv: ServerProcess, prompt, timeout: float) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
                      timeout=timeout)


def _health(srv: ServerProcess) -> int:
    return httpx.get(srv.base_url + "/health", timeout=5).status_code


def test_a_step_past_the_limit_is_503_until_it_completes(long_model_dir, tmp_path):
    srv = ServerProcess(["--model", str(long_model_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--num-threads", "1", "--kv-cache-memory", "64MiB", "--no-lora",
                         "--max-num-batched-tokens", "16384", "--engine-step-timeout", str(LIMIT_S)],
                        tmp_path / "server.log")
    long: dict[str, float] = {}
    try:
        idle_until = time.monotonic() + 3 * LIMIT_S
        while time.monotonic() < idle_until:  # waiting for work, several limits long
            assert _health(srv) == 200
            time.sleep(0.1)
        assert _complete(srv, "hello", 60).status_code == 200  # short steps
        assert _health(srv) == 200

        def post() -> None:
            t = time.monotonic()
            long["status"] = _complete(srv, PROMPT, 300).status_code
            long["seconds"] = time.monotonic() - t

        thread = threading.Thread(target=post)
        thread.start()
        while thread.is_alive() and _health(srv) == 200:
            time.sleep(0.05)
        assert thread.is_alive(), f"the {long.get('seconds', 0):.1f} s step never turned /health to 503"
        # Hung (the step goes on): everything that needs the engine answers 503 at once.
        ready = httpx.get(srv.base_url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "engine_down"
        t = time.monotonic()
        refused = _complete(srv, "hello", 10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - t < 2
        assert srv.metric("loramux_engine_step_age_seconds") > LIMIT_S
        stuck_while_running = thread.is_alive()
        thread.join(300)
        assert long["status"] == 200  # the request of the long step was kept, and finished
        deadline = time.monotonic() + 10
        while _health(srv) != 200:
            assert time.monotonic() < deadline, "serving did not resume after the step completed"
            time.sleep(0.1)
        assert httpx.get(srv.base_url + "/ready", timeout=5).status_code == 200
        assert _complete(srv, "hello", 60).status_code == 200
        assert srv.metric("loramux_engine_step_age_seconds") < LIMIT_S
        log = srv.log_path.read_text()
    finally:
        srv.stop()
    assert stuck_while_running, "the step ended before the checks: they may have seen its end"
    assert long["seconds"] > 2 * LIMIT_S
    assert "the engine loop's current step has run for" in log and "serving resumes" in log, log[-3000:]


def test_a_dead_cores_step_age_is_zero_not_the_time_since_its_last_heartbeat(long_model_dir, tmp_path):
    """The server extrapolates the step age from the core's last heartbeat; once the core has
    died mid-step no loop runs any more, and the gauge must say 0 instead of growing forever."""
    srv = ServerProcess(["--model", str(long_model_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--num-threads", "1", "--kv-cache-memory", "64MiB", "--no-lora",
                         "--max-num-batched-tokens", "16384", "--engine-step-timeout", "300"],
                        tmp_path / "server.log")
    try:
        thread = threading.Thread(target=lambda: _complete(srv, PROMPT, 300))
        thread.start()
        deadline = time.monotonic() + 60
        while srv.metric("loramux_engine_step_age_seconds") == 0:  # a heartbeat from inside the long step
            assert thread.is_alive() and time.monotonic() < deadline, "no heartbeat came during the step"
            time.sleep(0.05)
        os.kill(core_pid(srv), signal.SIGKILL)
        thread.join(60)
        deadline = time.monotonic() + 30
        while _health(srv) != 503:
            assert time.monotonic() < deadline, "the core's death never showed"
            time.sleep(0.1)
        time.sleep(0.5)
        assert srv.metric("loramux_engine_step_age_seconds") == 0
    finally:
        srv.stop()
