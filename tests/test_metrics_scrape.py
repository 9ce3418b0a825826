"""A scrape of /metrics during a long engine step: it answers at once, and shows the request in
that step as running and one that arrived meanwhile as waiting (what a router picking a pod
needs, the Gateway API Inference Extension's endpoint picker every 50 ms). The step is a 14,000-
token prefill on a tiny random model (seconds on one CPU thread).

With the engine core in its own process (the default), the core took a metrics call off its input
channel only between steps: each scrape waited for the step to end (3.5 s here), then showed
neither request. In-process (`--engine-process off`) it always answered at once."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from conftest import save_tiny_model
from server_process import ServerProcess

PROMPT = [5 + i % 300 for i in range(14000)]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("long-context"), "llama", max_position_embeddings=16384)


def value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_scrape_during_a_long_step_answers_at_once_and_sees_the_queue(long_model_dir, tmp_path, mode):
    srv = ServerProcess(["--model", str(long_model_dir), "--served-model-name", "tiny", "--dtype", "float32",
                         "--num-threads", "1", "--kv-cache-memory", "64MiB", "--no-lora",
                         "--max-num-batched-tokens", "16384", "--engine-process", mode], tmp_path / "server.log")
    try:
        done: dict[str, tuple[int, float]] = {}

        def post(name: str, prompt: list[int]) -> None:
            t = time.monotonic()
            r = httpx.post(srv.base_url + "/v1/completions", timeout=300,
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
            done[name] = (r.status_code, time.monotonic() - t)

        long = threading.Thread(target=post, args=("long", PROMPT))
        long.start()
        short = None
        scrapes = []  # (seconds the scrape took, running, waiting)
        while long.is_alive():
            t = time.monotonic()
            text = srv.scrape()
            scrapes.append((time.monotonic() - t, value(text, "vllm:num_requests_running"),
                            value(text, "vllm:num_requests_waiting")))
            if scrapes[-1][1] == 1 and short is None:  # the long prefill is in its step now
                short = threading.Thread(target=post, args=("short", [5, 6, 7]))
                short.start()
                time.sleep(0.3)  # handed to the engine, which is inside the step
            time.sleep(0.05)
        long.join()
        if short is not None:
            short.join()
    finally:
        srv.stop()
    assert done["long"][0] == 200
    step = done["long"][1]
    assert step > 1.0, f"the long prefill took {step:.2f} s: too short to scrape during it"
    slowest = max(d for d, _, _ in scrapes)
    assert slowest < step / 3, f"a scrape took {slowest:.2f} s during a {step:.2f} s request: {scrapes}"
    assert any(run == 1 and wait == 1 for _, run, wait in scrapes), scrapes
