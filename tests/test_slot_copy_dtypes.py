"""A slot write's device-side copies (server/adapters/slots.py `_write`) under the rule torch's CUDA
multi-tensor copy follows, checked on CPU.

`torch._foreach_copy_(dsts, srcs)` on CUDA takes a fused kernel when every tensor is dense, each
pair has equal sizes and strides and every source has one dtype; that kernel writes EVERY
destination as the first one's dtype, whatever the others' are (pytorch/pytorch#173383, fixed
by #173531 in January 2026, so not in every torch a GPU host may have). A slot write copies into
destinations of several dtypes (A, B, prototypes in the pool's dtype, the prototype flags bool,
DoRA rows float32), and in a pool of one slot the prototype and flag rows are dense: bf16 bytes
written over the bool flags and past their end. On CPU the copies take torch's per-tensor path,
so this emulates the CUDA route around the real call and fails when a mixed-dtype call would
take the fused kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.adapters.peft_format import load_peft_adapter
from server.adapters.slots import LoraSlots
from server.metrics import Metrics
from server.model.arch import ModelArch

from peft_adapters import make_peft_adapter


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (c10's rule): in some order of its dims, its strides are those
    of a contiguous tensor (dims of size 1 aside)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def takes_fused_cuda_path(dsts, srcs) -> bool:
    """Whether torch's CUDA `_foreach_copy_` would run these pairs in its fused kernel
    (aten/src/ATen/native/cuda/ForeachBinaryOpList.cu, before #173531)."""
    return (all(dense(t) for t in (*dsts, *srcs))
            and all(d.shape == s.shape and d.stride() == s.stride() for d, s in zip(dsts, srcs))
            and len({s.dtype for s in srcs}) == 1)


@pytest.fixture
def copies(monkeypatch) -> list[tuple[bool, set[torch.dtype]]]:
    """Every `_foreach_copy_` call of the test: (fused on CUDA?, its destinations' dtypes)."""
    seen = []
    real = torch._foreach_copy_

    def spy(dsts, srcs, *args, **kwargs):
        seen.append((takes_fused_cuda_path(dsts, srcs), {d.dtype for d in dsts}))
        return real(dsts, srcs, *args, **kwargs)
    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    return seen


@pytest.mark.parametrize("num_slots", [1, 3])
def test_no_fused_copy_mixes_destination_dtypes(tiny_llama_dir, tmp_path, copies, num_slots):
    arch = ModelArch.from_dir(tiny_llama_dir)
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "a", seed=5, r=16, lora_alpha=32, target_modules="all-linear")
    adapter = load_peft_adapter(Path(path), arch, name="a", max_rank=16)
    slots = LoraSlots(arch, num_slots, 16, torch.bfloat16, torch.device("cpu"), Metrics())
    slots.activate({"a": adapter})
    assert copies, "the slot write made no multi-tensor copy: nothing checked"
    mixed = [dtypes for fused, dtypes in copies if fused and len(dtypes) > 1]
    assert not mixed, f"a fused CUDA copy would write {mixed[0]} destinations all as one dtype"
    slot = slots.book.slot_of("a")
    assert slots.proto_valid["qkv"][:, slot].all()  # every layer's q, k, v adapted: every flag set
