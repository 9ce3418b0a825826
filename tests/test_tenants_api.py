"""Tenants against a real server: keys (401s, admin key apart), quotas (429 + Retry-After +
x-ratelimit-*, then success after waiting), reloads (SIGHUP and the admin call, a bad file
refused, a stream running across the reload) and `loramux tenants add-key`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.tenants import hash_key
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
ADMIN = "admin-secret-key"
ACME, METERED, BETA, PAIR = "lmx-acme-key-1", "lmx-metered-key-1", "lmx-beta-key-1", "lmx-pair-key-1"
TOKENS_PER_MINUTE = 300  # 5 tokens/s back into the bucket
CAPPED, CAPPED_TOKENS_PER_MINUTE = "key-capped", 200  # under the tiny model's 512-token context


def tenants_toml(*, beta: bool = True, acme_keys: tuple[str, ...] = (ACME,)) -> str:
    keys = ", ".join(f'"{hash_key(k)}"' for k in acme_keys)
    text = f"""# written by tests/test_tenants_api.py
[tenants.acme]
keys = [{keys}]
weight = 2.0

[tenants.metered]
keys = ["{hash_key(METERED)}"]
tokens_per_minute = {TOKENS_PER_MINUTE}
requests_per_minute = 1000

[tenants.pair]
keys = ["{hash_key(PAIR)}"]
max_concurrent = 2

[tenants.capped]
keys = ["{hash_key(CAPPED)}"]
tokens_per_minute = {CAPPED_TOKENS_PER_MINUTE}
"""
    if beta:
        text += f'\n[tenants.beta]\nkeys = ["{hash_key(BETA)}"]\n'
    return text


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(tenants_toml())
    return path


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tenants_file, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--tenants", str(tenants_file),
                         "--admin-key", ADMIN], tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def complete(server, key: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra}
    return httpx.post(server.base_url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_a_bad_or_missing_key_is_a_401_openai_error(server):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(server, "lmx-not-a-key").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    resp = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert_openai_error(resp, 401, "invalid_api_key")
    assert client(server, ACME).completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_the_admin_key_is_no_tenant_key_and_a_tenant_key_opens_no_admin_route(server):
    assert_openai_error(complete(server, ADMIN), 401, "invalid_api_key")
    assert_openai_error(httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}),
                        401, "invalid_api_key")
    for key in (ACME, METERED, None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert_openai_error(httpx.post(server.base_url + "/v1/admin/reload_tenants", headers=headers),
                            401, "invalid_api_key")
        assert_openai_error(httpx.post(server.base_url + "/v1/unload_lora_adapter", headers=headers,
                                       json={"lora_name": "x"}), 401, "invalid_api_key")
    # /v1/adapters is a tenant route (the caller's adapters): it needs a tenant key, not the admin's.
    assert_openai_error(httpx.get(server.base_url + "/v1/adapters"), 401, "invalid_api_key")


def _reset_seconds(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?(?:(\d+)ms)?", text)
    assert m and text, text
    return int(m[1] or 0) * 60 + float(m[2] or 0) + int(m[3] or 0) / 1000


def test_tokens_quota_gives_429_with_retry_after_then_success_after_waiting(server):
    c = client(server, METERED)
    prompt_tokens = c.completions.create(model=MODEL, prompt="hi", max_tokens=1).usage.prompt_tokens
    max_tokens = 100
    cost = prompt_tokens + max_tokens  # reserved at admission; ignore_eos: all of it is used
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=max_tokens,
                                                 extra_body={"ignore_eos": True})
    assert raw.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert TOKENS_PER_MINUTE - (prompt_tokens + 1) - cost - 5 <= remaining <= TOKENS_PER_MINUTE - cost
    assert 0 < _reset_seconds(raw.headers["x-ratelimit-reset-tokens"]) <= 60
    assert raw.parse().usage.completion_tokens == max_tokens

    refused_before = server.metric("loramux_tenant_requests_total", 'status="rate_limited",tenant="metered"')
    # Spend the rest of the minute; the request that does not fit is refused with the wait.
    for _ in range(5):
        resp = complete(server, METERED, max_tokens=max_tokens, ignore_eos=True)
        if resp.status_code != 200:
            break
    err = assert_openai_error(resp, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    retry_after = int(resp.headers["retry-after"])
    assert 1 <= retry_after <= cost / (TOKENS_PER_MINUTE / 60) + 1
    assert resp.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) < cost
    assert _reset_seconds(resp.headers["x-ratelimit-reset-tokens"]) > 0
    assert server.metric("loramux_tenant_requests_total",
                         'status="rate_limited",tenant="metered"') == refused_before + 1
    # Another tenant is not affected.
    assert complete(server, ACME, max_tokens=max_tokens).status_code == 200

    time.sleep(retry_after)
    ok = complete(server, METERED, max_tokens=max_tokens, ignore_eos=True, stream=True)
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)  # streams carry them too
    assert ok.text.rstrip().endswith("data: [DONE]")

    # A request larger than a whole minute's tokens can never pass: 400, not a 429 to retry.
    assert_openai_error(complete(server, METERED, max_tokens=TOKENS_PER_MINUTE), 400, "request_too_large")


def test_without_max_tokens_generations_share_the_tenants_minute_of_tokens(server):
    """Before: a generation without max_tokens reserved the rest of the context (512 tokens with
    the prompt), over `capped`'s 200 tokens per minute: every chat that left max_tokens out was a
    400. Now the two choices each run to an equal share of the minute, prompt included."""
    r = client(server, CAPPED).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                       n=2, extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in r.choices] == ["length"] * 2
    share = CAPPED_TOKENS_PER_MINUTE // 2
    assert r.usage.completion_tokens == 2 * (share - r.usage.prompt_tokens)  # the prompt counts once in usage


def test_every_choice_frees_its_place_however_the_request_ends(server):
    """`pair` may run 2 generations at once and queue none: any place not given back would
    turn the next n=2 request into a 429."""
    c = client(server, PAIR)
    for _ in range(2):
        r = c.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=3)  # two prompts
        assert [ch.finish_reason for ch in r.choices] == ["length"] * 2
        chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                max_tokens=3, stream=True))
        assert sum(ch.choices[0].finish_reason == "length" for ch in chunks if ch.choices) == 2
    # A client that leaves mid-stream (n=2) frees both places.
    aborted = server.metric("loramux_requests_total", 'finish_reason="abort"')
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {PAIR}"},
                         json={"model": MODEL, "prompt": "x", "n": 2, "max_tokens": 400, "ignore_eos": True,
                               "stream": True}) as stream:
            assert next(line for line in stream.iter_lines() if line.startswith("data: "))
    _eventually(lambda: server.metric("loramux_requests_total", 'finish_reason="abort"') == aborted + 2)
    _eventually(lambda: complete(server, PAIR, n=2).status_code == 200)
    assert complete(server, PAIR, n=2).status_code == 200
    assert_openai_error(complete(server, PAIR, n=3), 400, "request_too_large")  # could never run


def _admin_reload(server) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/admin/reload_tenants", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=30)


def _eventually(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_reload_by_admin_call_and_sighup_with_a_stream_running_across(server, tenants_file):
    new_acme = "lmx-acme-key-2"
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {ACME}"},
                         json={"model": MODEL, "prompt": "a long one", "max_tokens": 400, "ignore_eos": True,
                               "stream": True, "stream_options": {"include_usage": True}}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # Reload mid-stream: acme's old key is replaced and beta removed.
            tenants_file.write_text(tenants_toml(beta=False, acme_keys=(new_acme,)))
            resp = _admin_reload(server)
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"status": "ok", "tenants": ["acme", "capped", "metered", "pair"]}
            assert_openai_error(complete(server, ACME), 401, "invalid_api_key")
            assert_openai_error(complete(server, BETA), 401, "invalid_api_key")
            assert complete(server, new_acme).status_code == 200
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 400  # the running stream completed

    # A bad file is refused with the reason, and the table in force stays.
    tenants_file.write_text(tenants_toml() + "\n[tenants.Bad]\nkeys = []\n")
    err = assert_openai_error(_admin_reload(server), 400, "invalid_tenants_file")
    assert "tenants.Bad" in err["message"]
    assert complete(server, new_acme).status_code == 200 and complete(server, BETA).status_code == 401
    tenants_file.write_text("this is [not toml")
    server.proc.send_signal(signal.SIGHUP)
    _eventually(lambda: "SIGHUP: tenants file refused" in server.log())
    assert server.proc.poll() is None and complete(server, new_acme).status_code == 200

    # SIGHUP with a good file, and `loramux tenants add-key` round trip.
    tenants_file.write_text(tenants_toml())
    proc = subprocess.run([sys.executable, "-m", "server.cli", "tenants", "add-key", "gamma", "--file",
                           str(tenants_file)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    gamma = proc.stdout.strip()
    assert gamma.startswith("lmx-") and len(gamma) > 40 and gamma not in tenants_file.read_text()
    assert hash_key(gamma) in tenants_file.read_text() and "# written by tests" in tenants_file.read_text()
    assert complete(server, gamma).status_code == 401  # not before the reload
    server.proc.send_signal(signal.SIGHUP)
    _eventually(lambda: complete(server, gamma).status_code == 200)
    assert complete(server, ACME).status_code == 200 and complete(server, BETA).status_code == 200
    assert complete(server, new_acme).status_code == 401
    # A second key for the same tenant keeps the first.
    proc = subprocess.run([sys.executable, "-m", "server.cli", "tenants", "add-key", "gamma", "--file",
                           str(tenants_file)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    gamma2 = proc.stdout.strip()
    assert _admin_reload(server).status_code == 200
    assert complete(server, gamma).status_code == 200 and complete(server, gamma2).status_code == 200


def test_add_key_refuses_to_edit_a_broken_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[tenants.acme\n")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "tenants", "add-key", "acme", "--file", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid TOML" in proc.stderr and not proc.stdout
    assert path.read_text() == "[tenants.acme\n"


def test_a_key_with_non_ascii_bytes_is_a_401_on_every_route(server):
    """Header values are latin-1: a key holding byte 0xe9 must be refused like any wrong key, on
    tenant routes and admin routes alike (before: the admin-key comparison, which also decides
    whether a /v1/adapters caller is the admin, raised TypeError on non-ASCII text: a 500)."""
    headers = {"Authorization": b"Bearer caf\xe9-key"}
    base = server.base_url
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/adapters", None),
                               ("DELETE", "/v1/adapters/x", None),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/admin/reload_tenants", None),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})):
        r = httpx.request(method, base + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, r.text)
        assert_openai_error(r, 401, "invalid_api_key")
    assert complete(server, ACME).status_code == 200  # and the server serves on
