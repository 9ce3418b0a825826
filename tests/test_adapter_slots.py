"""The device pool's per-slot routing prototypes, their flags and the DoRA rescale: written with
the adapter, reset where a new adapter of the slot does not reach, counted in the slot's bytes.

Expected contents are read from the parsed adapters (prototypes and g are checked against PEFT in
test_adapter_prototypes.py / test_adapter_dora.py); here the pool's copy of them is checked.
"""

from __future__ import annotations

import functools

import pytest
import torch

from server.adapters import parse_peft_adapter
from server.adapters.dora import with_dora_scales
from server.adapters.slots import LoraSlots
from server.metrics import Metrics
from server.model.arch import ModelArch
from server.model.loading import base_linear_weight, load_weights

from peft_adapters import make_peft_adapter
from test_adapter_dora import make_dora_adapter

R = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict:
    """dora: DoRA on q/v (rank 4); partial: plain on k/down (rank 4); full: plain all-linear at rank R."""
    root = tmp_path_factory.mktemp("slot-adapters")
    arch = ModelArch.from_dir(tiny_llama_dir)
    weights = load_weights(tiny_llama_dir, arch, torch.float32, torch.device("cpu"))
    base_weight = functools.partial(base_linear_weight, weights, arch)
    paths = {
        "dora": make_dora_adapter(tiny_llama_dir, root / "dora", r=4, target_modules=["q_proj", "v_proj"]),
        "partial": make_peft_adapter(tiny_llama_dir, root / "partial", seed=1, r=4, target_modules=["k_proj",
                                                                                                    "down_proj"]),
        "full": make_peft_adapter(tiny_llama_dir, root / "full", seed=2, r=R, target_modules="all-linear"),
    }
    return {n: with_dora_scales(parse_peft_adapter(p, arch, name=n, max_rank=R)[1], base_weight)
            for n, p in paths.items()}


def assert_slot_holds(slots: LoraSlots, slot: int, adapter) -> None:
    """The slot's prototypes, flags and rescale are exactly the adapter's (zero / False / 1.0 elsewhere)."""
    assert slots.slot_dora[slot] == adapter.use_dora
    for group, modules in slots.groups.items():
        for layer in range(len(slots.layer_a[group])):
            for i, module in enumerate(modules):
                w = adapter.modules.get((layer, module))
                lo, hi = slots.offsets[group][i], slots.offsets[group][i + 1]
                proto = slots.layer_proto[group][layer][slot, i]
                valid = bool(slots.layer_proto_valid[group][layer][slot, i])
                dora = slots.layer_dora[group][layer][slot, lo:hi]
                assert dora.dtype == torch.float32
                where = (group, layer, module)
                if w is None:
                    assert not valid and not proto.any() and torch.equal(dora, torch.ones_like(dora)), where
                    continue
                assert valid and torch.equal(proto, w.prototype.to(proto.dtype)), where
                want = w.dora_scale if w.dora_scale is not None else torch.ones_like(dora)
                assert torch.equal(dora, want), where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_slot_rewritten_by_each_kind(tiny_llama_dir, adapters, dtype):
    """One slot, rewritten in turn: DoRA, then a plain adapter on other modules (the old DoRA scales
    and prototypes must not survive), then one covering the whole slot (no zeroing pass), then DoRA."""
    arch = ModelArch.from_dir(tiny_llama_dir)
    slots = LoraSlots(arch, 1, R, dtype, torch.device("cpu"), Metrics())
    for name in ("dora", "partial", "full", "dora", "full", "partial"):
        placed = slots.activate({name: adapters[name]})
        assert placed == {name: 0}
        assert_slot_holds(slots, 0, adapters[name])
        assert slots.layer_proto["qkv"][0].dtype == dtype
    slots.evict("partial")
    assert slots.slot_dora == [False] and slots.slot_rank == [0]


def test_slots_side_by_side_and_eviction(tiny_llama_dir, adapters):
    arch = ModelArch.from_dir(tiny_llama_dir)
    slots = LoraSlots(arch, 3, R, torch.float32, torch.device("cpu"), Metrics())
    placed = slots.activate(adapters)
    for name, slot in placed.items():
        assert_slot_holds(slots, slot, adapters[name])
    assert slots.slot_dora == [adapters[n].use_dora for n in sorted(placed, key=placed.get)]
    slots.evict("dora")
    assert not slots.slot_dora[placed["dora"]]
    again = slots.activate({"dora": adapters["dora"]})
    assert_slot_holds(slots, again["dora"], adapters["dora"])


def test_dora_adapter_without_its_rescale_is_never_written(tiny_llama_dir, tmp_path):
    arch = ModelArch.from_dir(tiny_llama_dir)
    path = make_dora_adapter(tiny_llama_dir, tmp_path / "d", r=4, target_modules=["q_proj"])
    parsed = parse_peft_adapter(path, arch, name="d", max_rank=R)[1]
    slots = LoraSlots(arch, 1, R, torch.float32, torch.device("cpu"), Metrics())
    with pytest.raises(ValueError, match="dora_scale"):
        slots.activate({"d": parsed})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_bytes_count_every_pool_tensor(tiny_llama_dir, dtype):
    arch = ModelArch.from_dir(tiny_llama_dir)
    slots = LoraSlots(arch, 3, R, dtype, torch.device("cpu"), Metrics())
    assert slots.nbytes == 3 * LoraSlots.slot_nbytes(arch, R, dtype)
    esz = torch.empty((), dtype=dtype).element_size()
    extra = 0
    for group, modules in arch.lora_groups.items():
        n_in, n_out = arch.group_shape(group)
        extra += len(modules) * n_in * esz + len(modules) + n_out * 4  # prototypes, flags, DoRA scales
    lora_only = sum(t.numel() * t.element_size() for t in (*slots.a.values(), *slots.b.values())) // 3
    assert LoraSlots.slot_nbytes(arch, R, dtype) == lora_only + arch.num_layers * extra
