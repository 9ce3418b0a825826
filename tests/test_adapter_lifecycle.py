"""Adapter versions in the engine: an unregister never waits, a draining version keeps serving
the requests that hold it and is freed after the last one; a reload serves new requests only.

Reference outputs come from PEFT (greedy, fp32), never from this server.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from server.adapters.store_layout import CONFIG_NAME, WEIGHTS_NAME
from server.config import Config
from server.engine.engine import LLMEngine
from server.engine.request import GenerationRequest, InvalidRequestError, SamplingParams

from peft_adapters import make_peft_adapter, peft_greedy

NEW = 12
PROMPT = [5, 17, 42, 99]
QV = dict(target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def versions(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {v: make_peft_adapter(tiny_llama_dir, root / v, seed=s, r=4, lora_alpha=8, **QV)
            for v, s in (("v1", 11), ("v2", 12))}


@pytest.fixture
def engine(tiny_llama_dir, versions) -> LLMEngine:
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
    cfg.lora.adapters_dir = None
    cfg.lora.allowed_adapter_roots = [str(versions["v1"].parent)]
    return LLMEngine(cfg, tiny_llama_dir)


def submit(engine: LLMEngine, rid: str, adapter: str) -> None:
    engine.add_request(GenerationRequest(rid, PROMPT, SamplingParams(max_tokens=NEW, temperature=0.0,
                                                                     ignore_eos=True), adapter=adapter))


def drain(engine: LLMEngine, tokens: dict[str, list[int]], steps: int | None = None) -> None:
    """Step until nothing is unfinished (or `steps` steps). An idle step (waiting on an adapter's
    background load) sleeps a little, as the engine loop does: spinning would starve the loader
    thread of the GIL (one load here took 3 s behind 88,000 idle steps)."""
    deadline = time.monotonic() + 120
    n = 0
    while engine.has_unfinished() and (steps is None or n < steps):
        assert time.monotonic() < deadline, "the engine did not finish in 120 s"
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        n += 1
        if engine.idle:
            time.sleep(0.002)


def test_unregister_drains_then_frees(engine, versions, tiny_llama_dir):
    manager = engine.adapters
    manager.load_path(None, "bot", str(versions["v1"]))
    ref = manager.lookup(None, "bot")
    submit(engine, "old", "bot")
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens, steps=3)  # running, part-way through
    assert 0 < len(tokens["old"]) < NEW

    manager.unregister(None, "bot")  # returns at once, with a request still holding "bot"
    assert manager.lookup(None, "bot") is None and manager.visible(None) == []
    with pytest.raises(InvalidRequestError) as refused:
        submit(engine, "new", "bot")
    assert refused.value.code == "model_not_found"
    assert manager.residency(ref)[0] and manager.num_users(ref) == 1  # draining: weights stay

    drain(engine, tokens)
    assert tokens["old"] == peft_greedy(tiny_llama_dir, versions["v1"], PROMPT, NEW)[0]
    assert manager.residency(ref) == (False, False) and manager.num_users(ref) == 0  # freed after the last


def resident(engine: LLMEngine, tier: str) -> float:
    return engine.metrics.registry.get_sample_value("loramux_adapters_resident", {"tier": tier})


def test_the_resident_gauges_fall_to_zero_when_the_last_adapter_is_retired(engine, versions):
    """Retiring is the last thing an idle engine does (no later poll): the host gauge must follow
    at once, as the device one does (before: it kept counting the retired adapter until the next
    request, so an idle server showed adapters resident that were gone)."""
    manager = engine.adapters
    manager.load_path(None, "bot", str(versions["v1"]))
    submit(engine, "old", "bot")
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens, steps=3)
    assert resident(engine, "host") == 1 and resident(engine, "device") == 1
    manager.unregister(None, "bot")  # draining: retired by the last request's release
    drain(engine, tokens)
    assert resident(engine, "host") == 0 and resident(engine, "device") == 0

    manager.load_path(None, "bot", str(versions["v2"]))
    engine.step()  # the admin load's hand-over becomes resident
    assert resident(engine, "host") == 1
    manager.unregister(None, "bot")  # unused: retired at once
    assert resident(engine, "host") == 0


def test_reload_of_a_draining_name_serves_the_new_version_to_new_requests(engine, versions, tiny_llama_dir):
    manager = engine.adapters
    manager.load_path(None, "bot", str(versions["v1"]))
    old_ref = manager.lookup(None, "bot")
    submit(engine, "old", "bot")
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens, steps=3)
    manager.unregister(None, "bot")
    manager.load_path(None, "bot", str(versions["v2"]))  # same name, other weights, while v1 drains
    new_ref = manager.lookup(None, "bot")
    assert new_ref != old_ref
    submit(engine, "new", "bot")
    drain(engine, tokens)
    assert tokens["old"] == peft_greedy(tiny_llama_dir, versions["v1"], PROMPT, NEW)[0]
    assert tokens["new"] == peft_greedy(tiny_llama_dir, versions["v2"], PROMPT, NEW)[0]
    assert manager.residency(old_ref) == (False, False) and manager.residency(new_ref)[0]


def finished(engine: LLMEngine, adapter: str) -> float:
    value = engine.metrics.registry.get_sample_value(
        "loramux_requests_total", {"finish_reason": "length", "adapter": adapter})
    return value or 0.0


def test_retiring_a_drained_version_keeps_the_live_versions_series(engine, versions):
    """Metrics label an adapter by name, so the old version, retired when its last request ends,
    must not take the series of the version now serving that name with it (before: the old
    version's retirement removed every `adapter="bot"` series, the new version's counts included)."""
    manager = engine.adapters
    manager.load_path(None, "bot", str(versions["v1"]))
    engine.add_request(GenerationRequest("old", PROMPT, SamplingParams(max_tokens=3 * NEW, temperature=0.0,
                                                                      ignore_eos=True), adapter="bot"))
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens, steps=3)
    manager.unregister(None, "bot")
    manager.load_path(None, "bot", str(versions["v2"]))
    engine.add_request(GenerationRequest("new", PROMPT, SamplingParams(max_tokens=2, temperature=0.0,
                                                                      ignore_eos=True), adapter="bot"))
    while "new" not in tokens or len(tokens["new"]) < 2:
        drain(engine, tokens, steps=1)
    assert "old" in engine._seqs and finished(engine, "bot") == 1  # v2's request counted, v1 still draining
    drain(engine, tokens)  # v1's last request ends: v1 is retired
    assert finished(engine, "bot") == 2


def test_a_queued_request_keeps_a_deleted_store_adapter_and_a_reupload_serves_new_ones(tiny_llama_dir, versions,
                                                                                     tmp_path):
    """A store adapter, listed but never read, is deleted (files to the trash) while a request for it
    waits, and the name is uploaded again with other weights: the waiting request runs wholly on the
    old weights (read from the trash), a new one wholly on the new ones, and the trash is emptied."""
    store = tmp_path / "store"
    shutil.copytree(versions["v1"], store / "bot")
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
    cfg.lora.adapters_dir = str(store)
    engine = LLMEngine(cfg, tiny_llama_dir)
    manager = engine.adapters
    old_ref = manager.lookup(None, "bot")
    assert manager.residency(old_ref) == (False, False)
    submit(engine, "old", "bot")  # queued: no step has run, so no load has started
    manager.unregister(None, "bot", delete_files=True)
    assert not (store / "bot").exists()
    files = {name: (versions["v2"] / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    manager.upload(None, "bot", files)
    submit(engine, "new", "bot")
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens)
    assert tokens["old"] == peft_greedy(tiny_llama_dir, versions["v1"], PROMPT, NEW)[0]
    assert tokens["new"] == peft_greedy(tiny_llama_dir, versions["v2"], PROMPT, NEW)[0]
    assert manager.residency(old_ref) == (False, False)
    assert not any((store / ".trash").iterdir())  # the old files went with the old version


def test_files_changed_under_a_loaded_version_are_refused_not_mixed(tiny_llama_dir, versions, tmp_path):
    """A version is one set of files: the prefix cache keeps a version's KV, so a store adapter
    whose files are overwritten in place after its first load, and read again once the host cache
    evicted it, would serve its prompt's cached blocks from the old weights and the rest from the
    new ones. Its reload is refused instead (400 adapter_invalid, naming what to do), and the
    files it was registered with are what it served."""
    store = tmp_path / "store"
    shutil.copytree(versions["v1"], store / "bot")
    shutil.copytree(versions["v2"], store / "other")
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
    cfg.lora.adapters_dir, cfg.lora.max_cpu_loras = str(store), 1
    engine = LLMEngine(cfg, tiny_llama_dir)
    prompt = [(7 * i) % 200 + 3 for i in range(40)]  # two whole 16-token blocks to cache
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs: dict[str, list] = {}

    def run(rid: str, adapter: str) -> None:
        engine.add_request(GenerationRequest(rid, prompt, params, adapter=adapter))
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(out.request_id, []).append(out)
            if engine.idle:
                time.sleep(0.01)

    run("first", "bot")
    assert [t for o in outs["first"] for t in o.token_ids] == peft_greedy(tiny_llama_dir, versions["v1"], prompt, 4)[0]
    run("evict", "other")  # one adapter in the host cache: bot is evicted
    ref = engine.adapters.lookup(None, "bot")
    assert engine.adapters.residency(ref) == (False, False)
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # overwritten in place, same name, same version
        (store / "bot" / name).write_bytes((versions["v2"] / name).read_bytes())
    run("second", "bot")
    last = outs["second"][-1]
    assert last.error_code == "adapter_invalid", [t for o in outs["second"] for t in o.token_ids]
    assert "changed on disk" in last.error


def test_a_failed_reread_of_a_resident_version_fails_none_of_its_requests(engine, versions, tmp_path):
    """An admin load hands its parsed adapter to the host cache; a request that arrives between
    its registration and that hand-over makes the scheduler start a load of the same version too.
    If that second read fails (here: the files were removed meanwhile), the version is still
    resident and its requests run on (before: every request holding it failed, running ones too)."""
    path = Path(shutil.copytree(versions["v1"], versions["v1"].parent / f"bot-{tmp_path.name}"))  # an allowed root
    manager = engine.adapters
    ref = manager.load_path(None, "bot", str(path)).ref
    submit(engine, "old", "bot")
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens, steps=3)
    assert manager.residency(ref)[0] and 0 < len(tokens["old"]) < NEW
    (path / WEIGHTS_NAME).unlink()  # parsed once by the admin load: the server needs it no more
    cache = manager._cache  # the racing load, started as the scheduler's prefetch would have
    cache._loading.add(ref)
    cache._pool.submit(cache._load, ref).result(timeout=60)
    drain(engine, tokens)  # asserts no output carries an error
    assert tokens["old"] == peft_greedy(engine.info.model_dir, versions["v1"], PROMPT, NEW)[0]


def test_deleting_a_store_adapter_that_is_a_symlink_removes_the_link_only(tiny_llama_dir, versions, tmp_path):
    """An adapter directory of the store may be a symlink to another directory of the store (the
    README allows it). Deleting that adapter takes its name out of the store, not the directory
    it points to (before: the target went to the trash and was removed, files of the adapter
    served under the target's own name included)."""
    store = tmp_path / "store"
    shutil.copytree(versions["v1"], store / "base-bot")
    (store / "alias").symlink_to("base-bot", target_is_directory=True)
    cfg = Config()
    cfg.model.dtype, cfg.model.device, cfg.cache.kv_cache_memory = "float32", "cpu", 8 << 20
    cfg.lora.adapters_dir = str(store)
    engine = LLMEngine(cfg, tiny_llama_dir)
    manager = engine.adapters
    assert {e.name for e in manager.entries()} == {"alias", "base-bot"}
    submit(engine, "via-alias", "alias")
    manager.unregister(None, "alias", delete_files=True)
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens)  # the draining version retires when its request ends
    assert tokens["via-alias"] == peft_greedy(tiny_llama_dir, versions["v1"], PROMPT, NEW)[0]
    assert not (store / "alias").exists() and not (store / "alias").is_symlink()
    assert {CONFIG_NAME, WEIGHTS_NAME} <= {p.name for p in (store / "base-bot").iterdir()}
    submit(engine, "direct", "base-bot")
    drain(engine, tokens)
    assert tokens["direct"] == tokens["via-alias"]
