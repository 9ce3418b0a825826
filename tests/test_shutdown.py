"""Graceful shutdown on a real server: SIGTERM drains (readiness 503, new requests a fast 503,
streams in flight run to their end, exit 0), and when `--shutdown-timeout` runs out the
remaining streams end with finish_reason "abort" and `[DONE]` instead of hanging or being cut.

A tiny random model with a long context, so one stream of a few thousand tokens outlasts the
checks made during the drain (~600 tokens/s on one idle core; slower only makes it longer).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from conftest import save_tiny_model
from server_process import ServerProcess

CONTEXT = 8192
DEPLOYMENT = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "deployment.yaml"


def probe_paths() -> dict[str, str]:
    """The shipped Deployment's probes: these exact paths are what the tests below call."""
    import yaml

    (c,) = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
    return {probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-long"), "llama", max_position_embeddings=CONTEXT)


def start(model: Path, log: Path, *extra: str) -> ServerProcess:
    return ServerProcess(["--model", str(model), "--served-model-name", "tiny", "--num-threads", "1",
                          "--no-lora", "--max-model-len", str(CONTEXT), "--kv-cache-memory", "64MiB", *extra], log)


@dataclass
class Stream:
    """A streamed completion read on a thread: every `data:` payload, and when the stream ended."""

    base_url: str
    max_tokens: int
    chunks: list[dict] = field(default_factory=list)
    done: bool = False  # the `[DONE]` sentinel arrived
    error: BaseException | None = None
    ended_at: float | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": self.max_tokens, "ignore_eos": True,
                "temperature": 0, "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", self.base_url + "/v1/completions", json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    self.chunks.append(json.loads(line[6:]))
                    if len(self.chunks) >= 20:
                        self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream hangs ({len(self.chunks)} chunks so far)"
        assert self.error is None, repr(self.error)

    @property
    def finish_reasons(self) -> list[str]:
        return [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]
                and c["choices"][0]["finish_reason"]]

    @property
    def tokens(self) -> int:
        """Tokens streamed (from the logprobs: a token's text may be empty, e.g. half a UTF-8 character)."""
        return sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in self.chunks
                   if c["choices"] and c["choices"][0]["logprobs"])

    @property
    def usage(self) -> dict:
        return next(c["usage"] for c in self.chunks if c.get("usage"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ready_status(srv: ServerProcess) -> tuple[int, str]:
    r = httpx.get(srv.base_url + probe_paths()["readinessProbe"], timeout=5)
    return r.status_code, r.json()["status"]


def alive(srv: ServerProcess) -> bool:
    paths = probe_paths()
    return all(httpx.get(srv.base_url + paths[p], timeout=5).status_code == 200 for p in ("livenessProbe", "startupProbe"))


def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(long_model_dir, tmp_path):
    # --max-waiting 1: the one stream fills the queue, so readiness also shows "full" first.
    srv = start(long_model_dir, tmp_path / "server.log", "--shutdown-timeout", "120", "--max-waiting", "1")
    try:
        assert ready_status(srv) == (200, "ready") and alive(srv)
        stream = Stream(srv.base_url, max_tokens=2000)
        assert stream.started.wait(60) and stream.ended_at is None, stream.error
        assert ready_status(srv) == (503, "full")

        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: ready_status(srv) == (503, "draining"), 30, "/ready to say draining")
        assert alive(srv), "liveness stays up while draining: the pod is not killed before its streams end"

        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tiny", prompt="hi", max_tokens=5)
        # Refused at once, not queued: the answer came while the stream still runs (a request
        # queued behind the drain would be answered only after it), whatever the machine's speed.
        assert stream.ended_at is None, "the stream ended before the refusal: it waited, or the stream is too short"
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "shutting_down"

        stream.join(90)
        assert stream.done and stream.finish_reasons == ["length"]
        assert stream.tokens == stream.usage["completion_tokens"] == 2000
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        srv.stop()


def test_shutdown_timeout_aborts_streams_with_a_finish(long_model_dir, tmp_path):
    srv = start(long_model_dir, tmp_path / "server.log", "--shutdown-timeout", "1")
    try:
        stream = Stream(srv.base_url, max_tokens=CONTEXT - 16)  # ~13 s alone: outlives the 1 s drain
        assert stream.started.wait(60) and stream.ended_at is None, stream.error
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        stream.join(30)
        assert stream.ended_at - signalled < 8, "aborted when the shutdown timeout ran out"
        assert stream.done and stream.finish_reasons == ["abort"]
        assert 0 < stream.tokens == stream.usage["completion_tokens"] < CONTEXT - 16
        assert srv.proc.wait(15) == 0, srv.log()
    finally:
        srv.stop()


def test_a_second_signal_aborts_at_once(long_model_dir, tmp_path):
    """Ctrl+C twice (or SIGTERM twice): the operator does not want to wait out the drain."""
    srv = start(long_model_dir, tmp_path / "server.log", "--shutdown-timeout", "300")
    try:
        stream = Stream(srv.base_url, max_tokens=CONTEXT - 16)
        assert stream.started.wait(60) and stream.ended_at is None, stream.error
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: ready_status(srv) == (503, "draining"), 30, "/ready to say draining")
        assert stream.ended_at is None
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)

        stream.join(30)
        assert stream.ended_at - signalled < 8
        assert stream.done and stream.finish_reasons == ["abort"]
        assert srv.proc.wait(15) == 0, srv.log()
    finally:
        srv.stop()


def test_a_request_still_queued_when_the_drain_ends_gets_shutting_down_with_retry_after(long_model_dir, tmp_path):
    """A request waiting in its tenant's queue when the shutdown timeout runs out cannot run here
    any more: it gets the same fast 503 `shutting_down` + Retry-After as a request arriving
    during the drain, so its client retries on another replica."""
    from server.tenants import hash_key

    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.t]\nkeys = ["{hash_key("k")}"]\nmax_concurrent = 1\nmax_queued = 4\n')
    srv = start(long_model_dir, tmp_path / "server.log", "--tenants", str(tenants), "--shutdown-timeout", "1")
    answers: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        body = {"model": "tiny", "prompt": name, "max_tokens": CONTEXT - 16, "ignore_eos": True}
        answers[name] = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60,
                                   headers={"Authorization": "Bearer k"})

    try:
        threads = [threading.Thread(target=post, args=(name,)) for name in ("running", "queued")]
        threads[0].start()
        wait_for(lambda: srv.metric("loramux_requests_running") == 1, 30, "the first request to run")
        threads[1].start()
        time.sleep(1.0)  # in the tenant's queue (max_concurrent 1) behind a ~13 s generation
        assert "queued" not in answers
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert answers["running"].status_code == 200
        assert answers["running"].json()["choices"][0]["finish_reason"] == "abort"
        queued = answers["queued"]
        assert queued.status_code == 503, queued.text
        assert queued.json()["error"]["code"] == "shutting_down"
        assert queued.headers["retry-after"] == "1"
        assert srv.proc.wait(15) == 0, srv.log()
    finally:
        srv.stop()
