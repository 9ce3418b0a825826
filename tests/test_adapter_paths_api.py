"""Adapter paths over HTTP against a hostile store: symlinks never lead a read outside the
allowed roots (admin load, startup scan, background load), odd `lora_path`s get 4xx OpenAI
errors, no message carries file bytes, configured roots or server paths, and the base
model's name cannot be taken by an adapter."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import httpx
import pytest

from peft_adapters import make_peft_adapter
from server_process import ServerProcess

BASE = "tiny"
QV = dict(target_modules=["q_proj", "v_proj"])
REPO = Path(__file__).resolve().parent.parent  # the server's working directory
# The first 8 bytes of the secret, read as a safetensors header length, and the secret's size:
# what the old error message printed.
SECRET = b"SECRET-MARKER-7f3a9c:root:x:0:0:root:/root:/bin/bash\n" * 4
SECRET_AS_LENGTH = str(struct.unpack("<Q", SECRET[:8])[0])


@pytest.fixture(scope="module")
def layout(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("hostile")
    outside, store, uploads = top / "outside", top / "store", top / "uploads"
    for d in (outside, store, uploads):
        d.mkdir()
    make_peft_adapter(tiny_llama_dir, outside / "real", seed=11, r=4, lora_alpha=4, **QV)
    (outside / "secret").write_bytes(SECRET)

    make_peft_adapter(tiny_llama_dir, store / "good", seed=12, r=4, lora_alpha=4, **QV)
    shutil.copytree(store / "good", store / BASE)  # named as the base model: must not be served
    shutil.copytree(store / "good", store / "swapped")  # its weights become a link after startup

    linked = uploads / "linked-out"  # both files link to a valid adapter outside the roots
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(outside / "real" / name)
    passwd = uploads / "passwd"  # a valid config; the weights link to a secret outside
    passwd.mkdir()
    shutil.copy(outside / "real" / "adapter_config.json", passwd)
    (passwd / "adapter_model.safetensors").symlink_to(outside / "secret")
    (uploads / "loop-a").symlink_to(uploads / "loop-b")
    (uploads / "loop-b").symlink_to(uploads / "loop-a")
    os.mkfifo(uploads / "fifo")
    fifo_weights = shutil.copytree(store / "good", uploads / "fifo-weights")
    (fifo_weights / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo_weights / "adapter_model.safetensors")
    shutil.copytree(store / "good", uploads / "fine")
    return {"outside": outside, "store": store, "uploads": uploads}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, layout, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", BASE, "--dtype", "float32",
                         "--kv-cache-memory", "8MiB", "--num-threads", "1", "--adapters-dir", str(layout["store"]),
                         "--allowed-adapter-roots", str(layout["uploads"]), "--max-lora-rank", "8"],
                        tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


def load(server, name: str, path: str) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                      timeout=60)


def assert_clean_error(r: httpx.Response, status: int | tuple[int, ...], layout: dict[str, Path]) -> dict:
    """An OpenAI error with no file bytes, no configured root and no server path in it."""
    assert r.status_code in ((status,) if isinstance(status, int) else status), r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    text = r.text
    for leak in ("SECRET-MARKER", SECRET_AS_LENGTH, str(len(SECRET)), str(REPO), *map(str, layout.values()),
                 str(layout["store"].parent)):
        assert leak not in text, f"{leak!r} leaked: {text}"
    return err


def models(server) -> list[str]:
    return [m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]]


def test_admin_load_refuses_symlinked_files(server, layout):
    err = assert_clean_error(load(server, "linked", str(layout["uploads"] / "linked-out")), 400, layout)
    assert err["code"] == "adapter_invalid" and "symbolic link" in err["message"] and err["param"] == "lora_path"
    assert "linked" not in models(server)


def test_admin_load_never_echoes_the_linked_file(server, layout):
    err = assert_clean_error(load(server, "pw", str(layout["uploads"] / "passwd")), 400, layout)
    assert "adapter_model.safetensors" in err["message"] and "symbolic link" in err["message"]


@pytest.mark.parametrize("path,status", [
    ("loop-a", 400),  # a symlink loop
    ("fine\0x", 400),  # NUL
    ("x" * 5000, 400),  # over PATH_MAX
    ("y" * 300, (400, 404)),  # a component over NAME_MAX
    ("fifo", 400),  # not a directory, and must not block
    ("fifo-weights", 400),  # weights are a FIFO: must not block
    ("fine/adapter_config.json", 400),  # a file, not a directory
    ("does-not-exist", 404),
])
def test_admin_load_odd_paths_are_4xx(server, layout, path, status):
    err = assert_clean_error(load(server, "odd", str(layout["uploads"]) + "/" + path), status, layout)
    assert err["code"].startswith("adapter_") and err["param"] == "lora_path"
    assert "odd" not in models(server)


def test_outside_the_roots_is_forbidden_without_naming_them(server, layout):
    for path in (layout["outside"] / "real", layout["uploads"] / ".." / "outside" / "real", "/etc", "relative"):
        err = assert_clean_error(load(server, "out", str(path)), 403, layout)
        assert err["code"] == "adapter_forbidden" and err["param"] == "lora_path"


def test_base_model_name_is_reserved(server, layout):
    assert models(server).count(BASE) == 1  # the store's adapter named "tiny" was skipped
    err = assert_clean_error(load(server, BASE, str(layout["uploads"] / "fine")), 400, layout)  # as vLLM
    assert err["code"] == "adapter_exists" and err["param"] == "lora_name"
    assert models(server).count(BASE) == 1


def test_listings_show_no_server_paths(server, layout):
    r = load(server, "fine", str(layout["uploads"] / "fine"))
    assert r.status_code == 200, r.text
    cards = {m["id"]: m for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
    assert {"good", "fine"} <= set(cards)
    assert all(cards[name]["root"] == name for name in ("good", "fine"))
    listing = httpx.get(server.base_url + "/v1/adapters")
    assert listing.status_code == 200
    by_id = {a["id"]: a for a in listing.json()}
    assert by_id["fine"]["location"] == "fine" and by_id["good"]["location"] == "good"
    for text in (listing.text, httpx.get(server.base_url + "/v1/models").text):
        assert str(layout["store"].parent) not in text and str(REPO) not in text


def test_background_load_refuses_a_link_swapped_in_after_registration(server, layout):
    """'swapped' passed the startup scan; its weights are replaced by a link to a valid adapter
    outside before its first use, which loads it on the loader thread."""
    weights = layout["store"] / "swapped" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(layout["outside"] / "real" / "adapter_model.safetensors")
    r = httpx.post(server.base_url + "/v1/completions",
                   json={"model": "swapped", "prompt": "x", "max_tokens": 2}, timeout=60)
    err = assert_clean_error(r, 400, layout)
    assert err["code"] == "adapter_invalid" and "symbolic link" in err["message"]
    r = httpx.post(server.base_url + "/v1/completions", json={"model": "good", "prompt": "x", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200  # everyone else keeps being served
