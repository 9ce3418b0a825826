"""Servers with the engine core in its own process (`--engine-process on`) or on a thread of the
HTTP process (`off`), on the tiny model with one tenant and an admin key: what
tests/test_engine_process*.py start and share. Import the fixtures into a test module to use them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import openai
import pytest

from peft_adapters import make_peft_adapter
from server.tenants.keys import hash_key
from server_process import ServerProcess

BASE = "tiny"
ADMIN = "admin-secret"
ALPHA, GAMMA = "key-alpha", "key-gamma"


def tenants_toml(gamma: bool = False) -> str:
    text = f'[tenants.alpha]\nkeys = ["{hash_key(ALPHA)}"]\n'
    if gamma:
        text += f'\n[tenants.gamma]\nweight = 2.0\nkeys = ["{hash_key(GAMMA)}"]\n'
    return text


def start(model: Path, tmp: Path, tenants: Path, roots: Path, log: str, mode: str = "on",
          *flags: str, wait: bool = True) -> ServerProcess:
    return ServerProcess(["--model", str(model), "--served-model-name", BASE, "--dtype", "float32",
                          "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", "",
                          "--tenants", str(tenants), "--admin-key", ADMIN, "--allowed-adapter-roots", str(roots),
                          "--engine-process", mode, *flags], tmp / log, wait=wait)


def core_pid(srv: ServerProcess) -> int:
    """The engine core's pid, as the server logs it once the core is ready."""
    for line in srv.log_path.read_text().splitlines():
        if "engine core process" in line and "ready" in line:
            return int(line.split("engine core process", 1)[1].split()[0])
    raise AssertionError("no engine core in the log:\n" + srv.log())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture(scope="module")
def roots(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-roots")
    make_peft_adapter(tiny_llama_dir, root / "qv", seed=3, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    return root


@pytest.fixture(scope="module")
def tenants(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(tenants_toml())
    return path


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tenants, roots, tmp_path_factory):
    srv = start(tiny_llama_dir, tmp_path_factory.mktemp("logs"), tenants, roots, "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALPHA, max_retries=0, timeout=60)


def admin(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body or None, headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=60)


