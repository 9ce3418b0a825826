"""The registry's change journal (server/adapters/registry.py `changes_since`) and the server
process's replica that catches up from it (server/engine/remote_adapters.py `apply`): after any
sequence of registrations, summaries learned, pins and removals, a replica refreshed at arbitrary
moments holds exactly the registry's live set, and a refresh carries what changed, not what is
registered."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from server.adapters import registry as registry_module
from server.adapters.registry import AdapterRegistry, RegistryChanges
from server.adapters.safe_files import AdapterDir
from server.engine.core_process import RegistrySnapshot
from server.engine.remote_adapters import RemoteAdapters
from server.adapters.peft_format import listed_summary
from test_adapter_safe_files import ARCH


def registered(tmp_path, registry: AdapterRegistry, owner: str | None, name: str):
    where = AdapterDir(tmp_path, (name,))
    return registry.add(owner, name, where, "store", replace=True, summary=listed_summary(where, name))


def live(registry: AdapterRegistry) -> dict:
    return {e.ref.key: e for e in registry.entries()}


def test_changes_since_carries_only_what_changed(tmp_path):
    registry = AdapterRegistry(ARCH, 8, [])
    for i in range(10_000):
        registered(tmp_path, registry, None, f"a{i}")
    everything = registry.changes_since(0)
    assert not everything.full and len(everything.entries) == 10_000 and not everything.removed
    now = everything.generation
    assert registry.changes_since(now).entries == [] and registry.changes_since(now).removed == []

    pinned = registry.set_pinned(None, "a7", True)
    registry.remove(None, "a8")
    newer = registered(tmp_path, registry, "t1", "a9")  # a tenant's own a9 beside the shared one
    learned = replace(pinned.summary, rank=4, inspected=True)
    registry.record_summary(pinned.ref, learned)
    changes = registry.changes_since(now)
    assert {e.ref.key: e for e in changes.entries} == {(None, "a7"): registry.get(None, "a7"),
                                                       ("t1", "a9"): newer}
    assert registry.get(None, "a7").pinned and registry.get(None, "a7").summary.rank == 4
    assert changes.removed == [(None, "a8")] and changes.generation > now


def test_a_replica_refreshed_at_random_moments_equals_the_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "_REMOVALS_KEPT", 3)  # forget removals early: full resyncs happen
    rng = random.Random(0)
    registry = AdapterRegistry(ARCH, 8, [])
    replica = RemoteAdapters(None, RegistrySnapshot(registry.changes_since(0)), step_capacity=0)
    names = [(owner, f"n{i}") for owner in (None, "t1", "t2") for i in range(12)]
    fulls = 0
    for _ in range(1500):
        owner, name = rng.choice(names)
        op = rng.random()
        if op < 0.45:
            registered(tmp_path, registry, owner, name)
        elif op < 0.8:
            if registry.get(owner, name) is not None:
                registry.remove(owner, name)
        elif op < 0.9:
            if registry.get(owner, name) is not None:
                registry.set_pinned(owner, name, rng.random() < 0.5)
        else:
            entry = registry.get(owner, name)
            if entry is not None:
                registry.record_summary(entry.ref, replace(entry.summary, rank=rng.choice([2, 4, 8]), inspected=True))
        if rng.random() < 0.05:  # refresh now and then, as the server does (once a second, after admin calls)
            changes = registry.changes_since(replica._generation)
            fulls += changes.full
            replica.apply(RegistrySnapshot(changes))
            assert {e.ref.key: e for e in replica.entries()} == live(registry)
            assert replica.entries() == registry.entries()  # the same listing order
            for key in names:
                assert replica.get(*key) == registry.get(*key)
    assert fulls > 0, "the test meant to cover replicas older than the journal's horizon"


def test_an_overtaken_answer_does_not_roll_the_replica_back(tmp_path):
    registry = AdapterRegistry(ARCH, 8, [])
    a = registered(tmp_path, registry, None, "a")
    replica = RemoteAdapters(None, RegistrySnapshot(registry.changes_since(0)), step_capacity=0)
    old = registry.changes_since(replica._generation)  # asked first, answered late
    registry.remove(None, "a")
    replica.apply(RegistrySnapshot(registry.changes_since(replica._generation)))
    replica.apply(RegistrySnapshot(old))
    assert replica.get(None, "a") is None and not replica.exists("a")
    replica.apply(RegistrySnapshot(RegistryChanges(old.generation, True, [a])))  # a whole set, older than the replica
    assert not replica.exists("a")


@pytest.mark.parametrize("host,device", [(True, False), (True, True)])
def test_residency_absent_from_the_snapshot_means_not_resident(tmp_path, host, device):
    registry = AdapterRegistry(ARCH, 8, [])
    a, b = (registered(tmp_path, registry, None, n).ref for n in ("a", "b"))
    replica = RemoteAdapters(None, RegistrySnapshot(registry.changes_since(0), {a: (host, device)}), 0)
    assert replica.residency(a) == (host, device) and replica.residency(b) == (False, False)
