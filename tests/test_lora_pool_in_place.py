"""A load is written into the pool by the loader thread (on CPU in place; on a GPU on a copy
stream of its own, overlapped with the steps), and a step that uses it copies nothing (issue 11, item 1). The writes never touch
a slot of the running step or of a kept adapter, and a step that needs every slot while a loader
writes one waits for it. References: PEFT for the tokens; the parsed adapters for slot contents.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from server.adapters.manager import pool_dtype
from server.adapters.peft_format import load_peft_adapter
from server.adapters.slots import LoraSlots
from server.metrics import Metrics
from server.model.arch import ModelArch

from engine_runs import greedy_with_logprobs, warm
from peft_adapters import make_peft_adapter, peft_greedy
from test_lora_pool import _slot_holds, engine_for

NEW = 4


@pytest.fixture(scope="module")
def four(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("in-place")
    targets = (["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"], ["gate_proj", "up_proj"])
    return {f"p{i}": make_peft_adapter(tiny_llama_dir, root / f"p{i}", seed=300 + i, r=4 * (i + 1),
                                       lora_alpha=8, target_modules=targets[i]) for i in range(4)}


def _writes(metrics: Metrics) -> float:
    return metrics.adapter_slot_writes._value.get()


@pytest.mark.parametrize("device, loaders", [("cpu", None), ("cpu", 4), pytest.param("cuda", None, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_loads_land_in_the_pool_and_steps_copy_nothing(tiny_llama_dir, four, device, loaders):
    """Also with four loaders writing at once (distinct slots, exact contents)."""
    engine = engine_for(tiny_llama_dir, four, device=device, adapter_loaders=loaders)
    manager = engine.adapters
    warm(engine, four)
    refs = {n: manager.lookup(None, n) for n in four}
    assert all(manager.residency(r) == (True, True) for r in refs.values())  # in the pool before any step
    assert _writes(engine.metrics) == len(four)  # each written once, by the loader
    jobs = [(n, [5, 6 + i, 7]) for i, n in enumerate(four)] + [(None, [8, 9])]
    tokens, _ = greedy_with_logprobs(engine, jobs, NEW)
    assert _writes(engine.metrics) == len(four)  # the steps found them all in place
    for (adapter, prompt), got in zip(jobs, tokens):
        assert got == peft_greedy(tiny_llama_dir, four[adapter] if adapter else None, prompt, NEW)[0], adapter


def _weights(model_dir, paths) -> dict:
    arch = ModelArch.from_dir(model_dir)
    return {n: load_peft_adapter(p, arch, name=n, max_rank=16) for n, p in paths.items()}


def test_in_place_writes_spare_the_step_and_the_kept(tiny_llama_dir, four):
    w = _weights(tiny_llama_dir, four)
    slots = LoraSlots(ModelArch.from_dir(tiny_llama_dir), 2, 16, torch.float32, torch.device("cpu"), Metrics())
    placed = slots.activate({"p0": w["p0"], "p1": w["p1"]})
    assert not slots.write_in_place("p2", w["p2"])  # both slots hold the running step's adapters
    slots.activate({"p0": w["p0"]})
    slots.protect({"p1"})
    assert not slots.write_in_place("p2", w["p2"])  # p0 runs, p1 is kept
    slots.protect(set())
    assert slots.write_in_place("p2", w["p2"])  # over p1: neither in the step nor kept
    assert not slots.is_resident("p1") and slots.is_resident("p0")
    writes = _writes(slots.metrics)
    again = slots.activate({"p0": w["p0"], "p2": w["p2"]})
    assert _writes(slots.metrics) == writes  # a lookup, no copy
    assert again["p2"] == placed["p1"] and again["p0"] == placed["p0"]
    assert _slot_holds(slots, again["p0"], w["p0"]) and _slot_holds(slots, again["p2"], w["p2"])


def _held_loader(slots: LoraSlots, name: str, weights, release: threading.Event) -> threading.Thread:
    """A loader thread writing `name` in place, held mid-write (its slot taken) until `release`."""
    writing = threading.Event()
    write = slots._write

    def slow_write(slot, adapter):
        if threading.current_thread() is not threading.main_thread():
            writing.set()
            assert release.wait(30)
        write(slot, adapter)

    slots._write = slow_write
    loader = threading.Thread(target=slots.write_in_place, args=(name, weights))
    loader.start()
    assert writing.wait(30)
    return loader


def test_a_step_needing_every_slot_waits_for_a_write_in_progress(tiny_llama_dir, four):
    """Two slots: p0 resident, a loader writing p1 into the other one (held mid-write); a step of
    p0 and p2 has no slot until that write ends, then takes p1's (not in the step) and is exact."""
    w = _weights(tiny_llama_dir, four)
    slots = LoraSlots(ModelArch.from_dir(tiny_llama_dir), 2, 16, torch.float32, torch.device("cpu"), Metrics())
    slots.activate({"p0": w["p0"]})
    slots.protect(set())
    release = threading.Event()
    loader = _held_loader(slots, "p1", w["p1"], release)
    result = {}
    step = threading.Thread(target=lambda: result.update(slots.activate({"p0": w["p0"], "p2": w["p2"]})))
    step.start()
    time.sleep(0.3)
    assert step.is_alive() and not result  # waiting: no slot may be taken from under the loader
    release.set()
    loader.join(30)
    step.join(30)
    assert not step.is_alive() and set(result) == {"p0", "p2"}
    assert not slots.is_resident("p1")  # written, then evicted for the step (the LRU one not in it)
    assert _slot_holds(slots, result["p0"], w["p0"]) and _slot_holds(slots, result["p2"], w["p2"])


def test_auto_pool_dtype_is_float32_on_cpu_and_the_model_dtype_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pool_dtype("auto", torch.bfloat16, cpu) == torch.float32
    assert pool_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert pool_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16


def test_slot_groups_name_the_groups_each_slot_adapts(tiny_llama_dir, four):
    """What a step may skip: a group no slot of it adapts (all zeros there). Set on every write,
    cleared on eviction, replaced on a rewrite."""
    arch = ModelArch.from_dir(tiny_llama_dir)
    w = _weights(tiny_llama_dir, four)
    slots = LoraSlots(arch, 1, 16, torch.float32, torch.device("cpu"), Metrics())
    # independently of the pool: each PEFT module's fused group, from the model's lora_groups
    group_of = {m: g for g, modules in arch.lora_groups.items() for m in modules}
    for name in ("p2", "p0", "p1", "p3"):  # o/down, then q/v, then all-linear, then gate/up
        slots.activate({name: w[name]})
        want = {group_of[module] for _, module in w[name].modules}
        assert slots.slot_groups[0] == want, name
        for group in set(arch.lora_groups) - want:  # the claim a skip relies on: zeros there
            assert not slots.a[group][:, 0].any() and not slots.b[group][:, 0].any(), (name, group)
    slots.evict("p3")
    assert slots.slot_groups[0] == frozenset()


def test_two_writers_of_one_adapter_leave_one_slot_and_leak_none(tiny_llama_dir, four):
    """An admin load hands its parsed adapter to the pool (`offer`) while a loader, started by a
    request that arrived once the name was registered, writes the same version: whichever commits
    second must give its slot back (before: it overwrote the first one's entry, and that slot and
    its pages were lost to the pool for good)."""
    w = _weights(tiny_llama_dir, four)
    slots = LoraSlots(ModelArch.from_dir(tiny_llama_dir), 3, 16, torch.float32, torch.device("cpu"), Metrics())
    release = threading.Event()
    first = _held_loader(slots, "p1", w["p1"], release)
    assert slots.write_in_place("p1", w["p1"])  # the other writer, done first
    release.set()
    first.join(30)
    assert not first.is_alive()
    slots.book.check()  # every slot and page free or held exactly once
    assert slots.num_resident == 1 and slots.book.free_pages == 2
    placed = slots.activate({"p0": w["p0"], "p1": w["p1"], "p2": w["p2"]})  # the whole pool is usable
    assert all(_slot_holds(slots, placed[n], w[n]) for n in ("p0", "p1", "p2"))
