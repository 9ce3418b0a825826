"""Adapters per tenant over HTTP, on a real server with a tenants file of three tenants:
visibility and isolation, uploads (validated in full, atomic, within quota), deletes, the vLLM
unload/load lifecycle during a running stream, and a restart that keeps every owner's adapters.

Expected generations come from PEFT on the same files, never from this server. The tests share
one server and build on each other's uploads, in file order (as pytest runs them).
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from conftest import save_tiny_model
from peft_adapters import make_peft_adapter, peft_greedy
from server.tenants import hash_key
from server_process import ServerProcess

BASE = "tiny"
ADMIN = "admin-secret"
KEYS = {"acme": "key-acme", "globex": "key-globex", "initech": "key-initech"}
QV = dict(target_modules=["q_proj", "v_proj"])
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_BODY = 256 << 10
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("made")
    made = {n: make_peft_adapter(tiny_llama_dir, root / n, seed=s, r=4, lora_alpha=8, **QV)
            for n, s in (("a", 21), ("b", 22), ("c", 23), ("d", 24))}
    nan = make_peft_adapter(tiny_llama_dir, root / "nan", seed=25, r=4, lora_alpha=8, **QV)
    weights = load_file(nan / WEIGHTS)
    next(iter(weights.values()))[1, 1] = float("nan")
    save_file(weights, nan / WEIGHTS)
    other = save_tiny_model(tmp_path_factory.mktemp("other-base"), "llama", hidden_size=32, intermediate_size=48)
    made["nan"] = nan
    made["other-base"] = make_peft_adapter(other, root / "other-base", seed=26, r=4, lora_alpha=8, **QV)
    return made


def tenants_file(path: Path) -> Path:
    path.write_text(f"""
[tenants.acme]
keys = ["{hash_key(KEYS['acme'])}"]
max_adapters = 3
[tenants.globex]
keys = ["{hash_key(KEYS['globex'])}"]
max_adapters = 1
[tenants.initech]
keys = ["{hash_key(KEYS['initech'])}"]
max_adapter_bytes = 1024
""")
    return path


def start(tiny_llama_dir: Path, store: Path, work: Path, log_name: str) -> ServerProcess:
    return ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                          "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(store),
                          "--allowed-adapter-roots", str(work), "--max-lora-rank", "16", "--max-loras", "2",
                          "--tenants", str(tenants_file(work / "tenants.toml")), "--admin-key", ADMIN,
                          "--max-body-bytes", str(MAX_BODY)], work / log_name)


@pytest.fixture(scope="module")
def work(tmp_path_factory, adapters) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def store(work, adapters) -> Path:
    store = work / "store"
    store.mkdir()
    import shutil
    shutil.copytree(adapters["a"], store / "shared-bot")  # a shared adapter every tenant may use
    return store


@pytest.fixture(scope="module")
def server(tiny_llama_dir, store, work):
    srv = start(tiny_llama_dir, store, work, "server.log")
    yield srv
    srv.stop()


class Api:
    """httpx calls as one tenant (or the admin), remembering every response body to check for paths."""

    def __init__(self, srv: ServerProcess, key: str | None, seen: list[str]):
        self.srv, self.seen = srv, seen
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def req(self, method: str, path: str, **kw) -> httpx.Response:
        r = httpx.request(method, self.srv.base_url + path, headers=self.headers, timeout=120, **kw)
        self.seen.append(r.text)
        return r

    def upload(self, name: str, adapter_dir: Path | None = None, *, files: dict[str, bytes] | None = None,
               **fields) -> httpx.Response:
        files = files if files is not None else {f: (adapter_dir / f).read_bytes() for f in (CONFIG, WEIGHTS)}
        return self.req("POST", "/v1/adapters", data={"name": name, **fields},
                        files={k: (k, v, "application/octet-stream") for k, v in files.items()})

    def complete(self, model: str, prompt: str = "hello", n: int = 10) -> httpx.Response:
        return self.req("POST", "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                         "temperature": 0, "ignore_eos": True})

    def models(self) -> set[str]:
        return {m["id"] for m in self.req("GET", "/v1/models").json()["data"]}

    def listing(self) -> dict[str, dict]:
        r = self.req("GET", "/v1/adapters")
        assert r.status_code == 200, r.text
        return {a["id"]: a for a in r.json()}


@pytest.fixture(scope="module")
def seen() -> list[str]:
    return []


@pytest.fixture(scope="module")
def api(server, seen):
    return {name: Api(server, key, seen) for name, key in {**KEYS, "admin": ADMIN}.items()}


def peft_text(tiny_llama_dir: Path, adapter_dir: Path, prompt: str = "hello", n: int = 10) -> str:
    """PEFT's greedy text; a character cut by the token limit (U+FFFD at the end) is dropped, as the
    server drops it."""
    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    return tok.decode(peft_greedy(tiny_llama_dir, adapter_dir, tok.encode(prompt).ids, n)[0]).rstrip("\ufffd")


def store_tree(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*")}


def test_same_name_for_two_tenants_each_serves_its_own(api, adapters, tiny_llama_dir):
    for tenant, made in (("acme", "b"), ("globex", "c")):
        r = api[tenant].upload("support-bot", adapters[made])
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "support-bot" and r.json()["owned_by"] == tenant
    for tenant, made in (("acme", "b"), ("globex", "c")):
        r = api[tenant].complete("support-bot")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == peft_text(tiny_llama_dir, adapters[made])
    # The shared adapter serves everyone; initech has no support-bot of its own.
    assert api["initech"].complete("shared-bot").status_code == 200
    assert api["initech"].models() == {BASE, "shared-bot"}
    assert api["acme"].models() == {BASE, "shared-bot", "support-bot"}


def not_found_shape(r: httpx.Response, name: str) -> dict:
    assert r.status_code == 404, r.text
    return {**r.json()["error"], "message": r.json()["error"]["message"].replace(name, "NAME")}


def test_another_tenants_adapter_answers_as_a_nonexistent_one(api, adapters):
    assert api["acme"].upload("acme-only", adapters["d"]).status_code == 200
    other, ghost = api["globex"], "no-such-adapter"
    assert "acme-only" not in other.models() and "acme-only" not in other.listing()
    pairs = [(other.complete("acme-only"), other.complete(ghost)),
             (other.req("POST", "/v1/completions", json={"model": BASE, "adapter_id": "acme-only", "prompt": "x"}),
              other.req("POST", "/v1/completions", json={"model": BASE, "adapter_id": ghost, "prompt": "x"})),
             (other.req("DELETE", "/v1/adapters/acme-only"), other.req("DELETE", f"/v1/adapters/{ghost}"))]
    for theirs, missing in pairs:
        assert not_found_shape(theirs, "acme-only") == not_found_shape(missing, ghost)
        assert theirs.json()["error"]["code"] == "model_not_found"
    # A tenant cannot delete a shared adapter either, nor act for another tenant.
    assert not_found_shape(other.req("DELETE", "/v1/adapters/shared-bot"), "shared-bot") == \
        not_found_shape(other.req("DELETE", f"/v1/adapters/{ghost}"), ghost)
    r = other.upload("sneaky", adapters["d"], tenant="acme")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert api["acme"].complete("acme-only").status_code == 200  # still there for its owner


def test_keys(api, server, seen):
    anon, bad = Api(server, None, seen), Api(server, "not-a-key", seen)
    for who in (anon, bad):
        for r in (who.req("GET", "/v1/models"), who.req("GET", "/v1/adapters"), who.complete("shared-bot"),
                  who.req("DELETE", "/v1/adapters/support-bot"), who.upload("x", files={CONFIG: b"{}", WEIGHTS: b""})):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    # A tenant key never opens an admin route.
    r = api["acme"].req("POST", "/v1/unload_lora_adapter", json={"lora_name": "shared-bot"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert api["acme"].complete("shared-bot").status_code == 200


def test_admin_acts_for_any_owner(api, adapters, tiny_llama_dir, work):
    admin = api["admin"]
    listing = admin.listing()
    assert {(a["id"], a["owned_by"]) for a in listing.values()} >= {("shared-bot", "loramux")}
    owners = {(a["id"], a["owned_by"]) for a in admin.req("GET", "/v1/adapters").json()}
    assert {("support-bot", "acme"), ("support-bot", "globex"), ("acme-only", "acme")} <= owners
    r = admin.upload("from-admin", adapters["c"], tenant="initech")  # the admin is not held to quotas
    assert r.status_code == 200 and r.json()["owned_by"] == "initech", r.text
    assert api["initech"].complete("from-admin").json()["choices"][0]["text"] == \
        peft_text(tiny_llama_dir, adapters["c"])
    assert "from-admin" not in api["acme"].models()
    assert admin.req("DELETE", "/v1/adapters/from-admin", params={"tenant": "initech"}).status_code == 200
    assert api["initech"].complete("from-admin").status_code == 404
    assert admin.upload("x", adapters["c"], tenant="nobody").status_code == 400
    # vLLM's load route with a "tenant": that tenant's adapter, for this process's life.
    import shutil
    path = str(shutil.copytree(adapters["b"], work / "for-initech"))
    r = admin.req("POST", "/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": path,
                                                          "tenant": "initech"})
    assert r.status_code == 200, r.text
    assert api["initech"].complete("by-path").json()["choices"][0]["text"] == \
        peft_text(tiny_llama_dir, adapters["b"])
    assert api["acme"].complete("by-path").status_code == 404
    assert admin.req("POST", "/v1/unload_lora_adapter", json={"lora_name": "by-path"}).status_code == 404
    r = admin.req("POST", "/v1/unload_lora_adapter", json={"lora_name": "by-path", "tenant": "initech"})
    assert r.status_code == 200 and api["initech"].complete("by-path").status_code == 404


@pytest.mark.parametrize("case", ["corrupt", "nan", "wrong-shapes", "oversize", "no-weights", "bad-json",
                                  "../evil", "..", "a/b", ".hidden", "", "x" * 65])
def test_bad_uploads_are_4xx_and_leave_nothing(api, adapters, store, case):
    good = {f: (adapters["d"] / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    name, files, status = "refused", dict(good), 400
    if case == "corrupt":
        files[WEIGHTS] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage" + bytes(range(256))
    elif case in ("nan", "wrong-shapes"):
        files = {f: (adapters["nan" if case == "nan" else "other-base"] / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    elif case == "oversize":
        files[WEIGHTS], status = good[WEIGHTS] + b"\0" * MAX_BODY, 413
    elif case == "no-weights":
        del files[WEIGHTS]
    elif case == "bad-json":
        files[CONFIG] = b"{not json"
    else:
        name = case
    before, listed = store_tree(store), set(api["acme"].listing())
    r = api["acme"].upload(name, files=files)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert set(api["acme"].listing()) == listed and store_tree(store) == before


def test_quotas(api, adapters):
    r = api["globex"].upload("second", adapters["d"])  # globex owns support-bot already: max_adapters = 1
    assert r.status_code == 403 and r.json()["error"]["code"] == "quota_exceeded", r.text
    r = api["initech"].upload("big", adapters["d"])  # more than initech's 1024 bytes
    assert r.status_code == 403 and r.json()["error"]["code"] == "quota_exceeded", r.text
    assert api["globex"].req("DELETE", "/v1/adapters/support-bot").status_code == 200
    assert api["globex"].upload("second", adapters["d"]).status_code == 200
    assert "support-bot" not in api["globex"].models()
    assert api["acme"].complete("support-bot").status_code == 200  # acme's namesake is untouched


def stream_text(srv: ServerProcess, model: str, n: int, started: threading.Event, out: dict) -> None:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=300)
    chunks = []
    for chunk in client.completions.create(model=model, prompt="hello", max_tokens=n, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        chunks.append(chunk.choices[0].text if chunk.choices else "")
        started.set()
    out["text"] = "".join(chunks)


def test_unload_and_reload_during_a_running_stream(server, api, adapters, tiny_llama_dir, work):
    """vLLM's unload answers 200 at once while a stream uses the adapter; the stream finishes with
    the weights it started with; new requests 404, then get the reloaded version."""
    import shutil
    admin, n = api["admin"], 300
    v1, v2 = shutil.copytree(adapters["b"], work / "v1"), shutil.copytree(adapters["c"], work / "v2")
    r = admin.req("POST", "/v1/load_lora_adapter", json={"lora_name": "live", "lora_path": str(v1)})
    assert r.status_code == 200, r.text
    started, out = threading.Event(), {}
    streamer = threading.Thread(target=stream_text, args=(server, "live", n, started, out))
    streamer.start()
    assert started.wait(60)
    r = admin.req("POST", "/v1/unload_lora_adapter", json={"lora_name": "live"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'live' removed successfully."
    # At once, mid-stream: the unload answered while the stream still runs (no clock involved).
    assert server.metric("loramux_requests_running") == 1
    assert api["acme"].complete("live").status_code == 404
    r = admin.req("POST", "/v1/load_lora_adapter", json={"lora_name": "live", "lora_path": str(v2)})
    assert r.status_code == 200, r.text  # the name is free again while v1 drains
    assert api["acme"].complete("live").json()["choices"][0]["text"] == peft_text(tiny_llama_dir, v2)
    streamer.join(300)
    assert out["text"] == peft_text(tiny_llama_dir, v1, n=n)


def test_no_path_in_any_response(seen, store, work):
    assert seen
    for text in seen:
        assert str(work) not in text and str(store) not in text and str(REPO) not in text and "/tmp/" not in text


def test_restart_keeps_tenant_adapters_with_their_owners(tiny_llama_dir, adapters, tmp_path):
    store, seen = tmp_path / "store", []
    srv = start(tiny_llama_dir, store, tmp_path, "first.log")
    try:
        acme, globex = Api(srv, KEYS["acme"], seen), Api(srv, KEYS["globex"], seen)
        assert acme.upload("keeper", adapters["b"]).status_code == 200
        assert globex.upload("keeper", adapters["c"]).status_code == 200
    finally:
        srv.stop()
    leftover = store / ".tmp-upload-crashed"  # a crash mid-upload leaves only this; it must go
    import shutil
    shutil.copytree(adapters["d"], leftover)
    srv = start(tiny_llama_dir, store, tmp_path, "second.log")
    try:
        acme, globex, initech = (Api(srv, KEYS[t], seen) for t in ("acme", "globex", "initech"))
        for who, made in ((acme, "b"), (globex, "c")):
            assert who.complete("keeper").json()["choices"][0]["text"] == peft_text(tiny_llama_dir, adapters[made])
            assert who.listing()["keeper"]["owned_by"] != "loramux"
        assert initech.complete("keeper").status_code == 404 and "keeper" not in initech.models()
        assert not leftover.exists()
    finally:
        srv.stop()
