"""Adapters over HTTP: choosing one by `model` or `adapter_id`, listing, and every refusal
answering with its error while the server keeps serving everyone else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from conftest import save_tiny_model
from peft_adapters import make_peft_adapter, peft_greedy
from server_process import ServerProcess

BASE = "tiny"
QV = dict(target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory) -> Path:
    """An adapter store with two good adapters and one whose weights hold a NaN (its header
    is fine, so it is listed; its first use must fail cleanly)."""
    root = tmp_path_factory.mktemp("store")
    make_peft_adapter(tiny_llama_dir, root / "alpha", seed=1, r=8, lora_alpha=16, **QV)
    make_peft_adapter(tiny_llama_dir, root / "beta", seed=2, r=4, lora_alpha=4,
                      target_modules=["gate_proj", "up_proj", "down_proj"])
    nan = make_peft_adapter(tiny_llama_dir, root / "nanny", seed=3, r=4, lora_alpha=4, **QV)
    weights = load_file(nan / "adapter_model.safetensors")
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, nan / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def uploads(tiny_llama_dir, tmp_path_factory) -> Path:
    """A directory the admin API may load from, holding good and bad adapters."""
    root = tmp_path_factory.mktemp("uploads")
    make_peft_adapter(tiny_llama_dir, root / "gamma", seed=4, r=8, lora_alpha=8, **QV)
    make_peft_adapter(tiny_llama_dir, root / "pickled", seed=5, r=4, lora_alpha=4, safe_serialization=False, **QV)
    make_peft_adapter(tiny_llama_dir, root / "too-big-rank", seed=6, r=32, lora_alpha=32, **QV)
    truncated = shutil.copytree(root / "gamma", root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    other_base = save_tiny_model(tmp_path_factory.mktemp("other-base"), "llama", hidden_size=32,
                                 intermediate_size=48)
    make_peft_adapter(other_base, root / "other-base", seed=7, r=4, lora_alpha=4, **QV)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, store, uploads, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                         "--allowed-adapter-roots", str(uploads), "--max-lora-rank", "16", "--max-loras", "2"],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_text(client, model: str, prompt: str, n: int = 10, **extra) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text


def serves(client, model: str = "alpha") -> bool:
    r = client.completions.create(model=model, prompt="still serving?", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    return r.usage.completion_tokens == 3


def test_models_lists_base_and_adapters_with_details(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "alpha", "beta", "nanny"}
    alpha = cards["alpha"].model_dump()
    # Store adapters register from the directory listing: details are unknown until the first load.
    assert alpha["parent"] == BASE and alpha["size_bytes"] > 0
    assert alpha["rank"] is None and alpha["target_modules"] is None
    greedy_text(client, "alpha", "x")
    alpha = {m.id: m for m in client.models.list().data}["alpha"].model_dump()
    assert alpha["rank"] == 8 and alpha["target_modules"] == ["q_proj", "v_proj"]


def test_adapter_by_model_and_by_adapter_id_match_peft(client, tiny_llama_dir, store):
    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    prompt = "The quick brown fox"
    ids = tok.encode(prompt).ids
    for name in ("alpha", "beta"):
        expected = tok.decode(peft_greedy(tiny_llama_dir, store / name, ids, 10)[0])
        assert greedy_text(client, name, prompt) == expected
        assert greedy_text(client, BASE, prompt, adapter_id=name) == expected
    assert greedy_text(client, BASE, prompt) == tok.decode(peft_greedy(tiny_llama_dir, None, ids, 10)[0])


def test_unknown_adapter_is_model_not_found(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        greedy_text(client, "no-such-adapter", "x")
    assert info.value.code == "model_not_found"
    r = httpx.post(server.base_url + "/v1/completions",
                   json={"model": BASE, "adapter_id": "ghost", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter_id"


def test_nan_weights_fail_at_first_use_and_others_keep_serving(server, client):
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "nanny", "prompt": "x", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "adapter_invalid" and "NaN" in r.json()["error"]["message"]
    assert serves(client)


@pytest.mark.parametrize("name,path,status,code,param", [
    ("p", "pickled", 400, "adapter_unsupported", "lora_path"),
    ("t", "truncated", 400, "adapter_invalid", "lora_path"),
    ("o", "other-base", 400, "adapter_incompatible", "lora_path"),
    ("r", "too-big-rank", 400, "adapter_unsupported", "lora_path"),
    ("../escape", "gamma", 400, "adapter_invalid", "lora_name"),  # the name is at fault, not the path
    ("missing", "does-not-exist", 404, "adapter_not_found", "lora_path"),
])
def test_admin_load_refusals(server, client, uploads, name, path, status, code, param):
    r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": name,
                                                                    "lora_path": str(uploads / path)})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["param"] == param, err
    assert name not in {m.id for m in client.models.list().data}
    assert serves(client)


@pytest.mark.parametrize("route,body,param,code", [
    ("load", {"lora_name": "gamma", "lora_path": "PATH", "lora_dir": "x"}, "lora_dir", "unsupported"),
    ("load", {"lora_name": "gamma", "lora_path": "PATH", "pinned": "true"}, "pinned", "invalid_request"),
    ("load", {"lora_name": 7, "lora_path": "PATH"}, "lora_name", "invalid_request"),
    ("load", '{"lora_name": "gamma", "lora_path": "PATH\\ud800"}', "lora_path", "invalid_unicode"),
    ("unload", {"lora_name": "alpha", "force": True}, "force", "unsupported"),
    ("unload", '{"lora_name": "alpha\\udc00"}', "lora_name", "invalid_unicode"),
])
def test_admin_bodies_are_strict(server, client, uploads, route, body, param, code):
    """Admin bodies follow the API's edge rules: unknown fields, coercible types and lone
    surrogates are 400s naming the field, and nothing is loaded or unloaded."""
    path = str(uploads / "gamma")
    if isinstance(body, str):
        content = body.replace("PATH", path)
    else:
        content = json.dumps({k: path if v == "PATH" else v for k, v in body.items()})
    r = httpx.post(f"{server.base_url}/v1/{route}_lora_adapter", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    served = {m.id for m in client.models.list().data}
    assert "alpha" in served and "gamma" not in served
    assert serves(client)


def test_admin_load_outside_allowed_roots_is_forbidden(server, store, tmp_path):
    outside = shutil.copytree(store / "alpha", tmp_path / "elsewhere")
    for path in (str(outside), str(store.parent / ".." / "etc")):
        r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code in (403, 404), r.text


def test_admin_load_use_unload(server, client, tiny_llama_dir, uploads):
    r = httpx.post(server.base_url + "/v1/load_lora_adapter",
                   json={"lora_name": "gamma", "lora_path": str(uploads / "gamma")})
    # vLLM's answers, which its tools check: a plain-text success line; 400 for a name already loaded.
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma' added successfully.", r.text
    again = httpx.post(server.base_url + "/v1/load_lora_adapter",
                       json={"lora_name": "gamma", "lora_path": str(uploads / "gamma")})
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"

    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    expected = tok.decode(peft_greedy(tiny_llama_dir, uploads / "gamma", tok.encode("hello").ids, 10)[0])
    assert greedy_text(client, "gamma", "hello") == expected
    listing = {a["id"]: a for a in httpx.get(server.base_url + "/v1/adapters").json()}
    assert listing["gamma"]["resident_host"] and listing["gamma"]["source"] == "admin"

    r = httpx.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma' removed successfully.", r.text
    with pytest.raises(openai.NotFoundError):
        greedy_text(client, "gamma", "hello")
    again = httpx.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert again.status_code == 404
    assert (again.json()["error"]["code"], again.json()["error"]["param"]) == ("adapter_not_found", "lora_name")


def test_more_adapters_than_slots_in_concurrent_requests(server):
    """Three adapters + base at once on a server with 2 slots: all answer, none fails."""
    import asyncio

    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            bodies = [{"model": m, "prompt": f"p{i}", "max_tokens": 12, "ignore_eos": True}
                      for i, m in enumerate(["alpha", "beta", BASE, "alpha", "beta", BASE])]
            return await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in responses)


def test_unloading_the_nan_adapter_and_metrics(server):
    text = httpx.get(server.base_url + "/metrics").text
    assert 'loramux_adapter_loads_total{result="error"}' in text
    assert "loramux_adapter_cache_misses_total" in text
    r = httpx.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": "nanny"})
    assert r.status_code == 200


def test_pin_and_unpin(server):
    r = httpx.post(server.base_url + "/v1/adapters/alpha/pin")
    assert r.status_code == 200 and r.json()["pinned"] is True
    r = httpx.post(server.base_url + "/v1/adapters/alpha/unpin")
    assert r.json()["pinned"] is False
    assert httpx.post(server.base_url + "/v1/adapters/ghost/pin").status_code == 404
