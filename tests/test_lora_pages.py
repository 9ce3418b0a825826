"""The adapter pool in rank-unit pages (server/adapters/slots.py): an adapter of rank r takes
ceil(r / u) pages anywhere in the pool, so the same bytes hold more small adapters; pages are
never shared, never leak, and an adapter the step uses is never evicted.

The weights a slot holds are read back here by hand from its pages (page j's rows i*u + c are
slice i's rank row j*u + c) and compared with the parsed PEFT adapter; the kernels reading the
same layout are checked against the reference in tests/test_kernels_pages.py, and whole-engine
parity with PEFT in tests/test_lora_pool.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from server.adapters.peft_format import load_peft_adapter
from server.adapters.slots import LoraSlots
from server.metrics import Metrics
from server.model.arch import ModelArch

from peft_adapters import make_peft_adapter

R, U = 16, 4
RANKS = (1, 3, 4, 7, 12, 16)  # within a page, a page exactly, several pages, the last one partial
TARGETS = ("all-linear", ["q_proj", "v_proj"], ["gate_proj", "down_proj"])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def arch(tiny_llama_dir) -> ModelArch:
    return ModelArch.from_dir(tiny_llama_dir)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, arch, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("paged")
    out = {}
    for i, rank in enumerate(RANKS * 2):
        path = make_peft_adapter(tiny_llama_dir, root / f"p{i}", seed=300 + i, r=rank, lora_alpha=2 * rank,
                                 target_modules=TARGETS[i % len(TARGETS)])
        out[f"p{i}"] = load_peft_adapter(Path(path), arch, name=f"p{i}", max_rank=R)
    return out


def pool(arch: ModelArch, num_slots: int, num_pages: int) -> LoraSlots:
    return LoraSlots(arch, num_slots, R, torch.float32, CPU, Metrics(), page_rank=U, num_pages=num_pages)


def held(slots: LoraSlots, slot: int, adapter) -> bool:
    """Whether `slot`'s pages hold exactly `adapter` (B pre-scaled), read through the page table."""
    table = slots.pages[slot].tolist()
    if table[:slots.pages_for(adapter.rank)] != list(slots.book.pages(slot)):
        return False
    for (layer, module), w in adapter.modules.items():
        group, i = slots._slice_of[module]
        lo, hi = slots.offsets[group][i], slots.offsets[group][i + 1]
        for r in range(w.rank):
            page = table[r // U]
            if not torch.equal(slots.a[group][layer, page, i * U + r % U], w.a[r]):
                return False
            if not torch.allclose(slots.b[group][layer, page, lo:hi, r % U], w.b[:, r] * w.scale):
                return False
    return True


def assert_consistent(slots: LoraSlots) -> None:
    """Every page is free or held by exactly one resident adapter, with the pages its rank needs."""
    book = slots.book
    book.check()
    held = [book.slot_of(n) for n in book.names()]
    used = [p for s in held for p in book.pages(s)]
    assert len(used) + book.free_pages == slots.num_pages
    for s in held:
        assert len(book.pages(s)) == slots.pages_for(slots.slot_rank[s])


def test_pages_hold_more_small_adapters_in_the_same_bytes(arch):
    full = LoraSlots.slot_nbytes(arch, R, torch.float32)
    page, handle = LoraSlots.page_nbytes(arch, U, torch.float32), LoraSlots.handle_nbytes(arch, torch.float32, R // U)
    assert page * (R // U) + handle == full + 4 * (R // U + 1)  # + its page table row and rank
    budget = 6 * full
    unpaged = LoraSlots.sized(arch, budget, R, torch.float32, CPU, Metrics(), max_slots=1000)
    paged = LoraSlots.sized(arch, budget, R, torch.float32, CPU, Metrics(), max_slots=1000, page_rank=U)
    assert unpaged.num_slots == unpaged.num_pages == 6 and not unpaged.paged and unpaged.pages is None
    # one slot per page (each adapter takes >= 1 page), within the budget
    assert paged.num_slots == paged.num_pages == budget // (page + handle)
    assert paged.num_slots > 3 * 6 and paged.nbytes <= budget
    assert paged.nbytes == paged.num_slots * handle + paged.num_pages * page
    # a cap on slots leaves no page no slot could use, and always room for one adapter of rank R
    capped = LoraSlots.sized(arch, budget, R, torch.float32, CPU, Metrics(), max_slots=2, page_rank=U)
    assert capped.num_slots == 2 and capped.num_pages == 2 * (R // U)
    tight = LoraSlots.sized(arch, page * (R // U) + handle, R, torch.float32, CPU, Metrics(), max_slots=1000,
                            page_rank=U)
    assert tight.num_pages >= R // U and tight.num_slots >= 1
    with pytest.raises(ValueError, match="must divide"):
        LoraSlots.sized(arch, budget, R, torch.float32, CPU, Metrics(), max_slots=8, page_rank=6)


def test_each_adapter_reads_back_from_its_pages(arch, adapters):
    slots = pool(arch, 12, 40)
    placed = slots.activate(adapters)
    assert len(set(placed.values())) == len(adapters)
    for name, slot in placed.items():
        assert held(slots, slot, adapters[name]), name
        assert slots.slot_rank[slot] == adapters[name].rank
    assert_consistent(slots)
    assert slots.book.free_pages == 40 - sum(slots.pages_for(a.rank) for a in adapters.values())


def test_a_step_fits_by_pages_and_never_loses_its_own_adapters(arch, adapters):
    """A pool of 6 pages: rank-16 adapters take 4, rank <= 4 take 1. The step's adapters stay put
    while others are evicted for room; a step whose pages exceed the pool is refused."""
    names = sorted(adapters)
    slots = pool(arch, 6, 6)
    rng = random.Random(5)
    for _ in range(60):
        step, pages = [], 0
        for name in rng.sample(names, len(names)):
            need = slots.pages_for(adapters[name].rank)
            if pages + need <= 6 and len(step) < 6:
                step.append(name)
                pages += need
        before = {n: slots.book.slot_of(n) for n in step if n in slots.book}
        placed = slots.activate({n: adapters[n] for n in step})
        for n in step:
            assert held(slots, placed[n], adapters[n]), n
            if n in before:
                assert placed[n] == before[n]  # resident ones are not moved or rewritten
        assert_consistent(slots)
    big = [n for n in names if adapters[n].rank == R]
    with pytest.raises(ValueError, match="pages in one step"):
        slots.activate({n: adapters[n] for n in big})  # 2 x 4 pages > 6


def test_loader_writes_take_free_pages_or_unused_adapters_only(arch, adapters):
    slots = pool(arch, 4, 5)
    a16 = next(n for n in adapters if adapters[n].rank == R)
    a1 = next(n for n in adapters if adapters[n].rank == 1)
    a3 = next(n for n in adapters if adapters[n].rank == 3)
    slots.activate({a16: adapters[a16]})  # 4 pages, in the step
    assert slots.write_in_place(a1, adapters[a1])  # the fifth page
    slots.protect([a1])  # a1 is the only candidate for a3's page
    assert not slots.write_in_place(a3, adapters[a3])
    assert slots.resident() == [a16, a1]
    slots.protect([])
    assert slots.write_in_place(a3, adapters[a3])  # evicts a1, not the step's a16
    assert slots.resident() == [a16, a3]
    assert_consistent(slots)


def test_no_page_leaks_after_churn(arch, adapters):
    slots = pool(arch, 5, 9)
    names = sorted(adapters)
    rng = random.Random(11)
    for i in range(200):
        name = rng.choice(names)
        if rng.random() < 0.3:
            slots.evict(name)
        elif rng.random() < 0.5:
            slots.write_in_place(name, adapters[name])
        else:
            slots.activate({name: adapters[name]})
        assert_consistent(slots)
        if name in slots.book:
            assert held(slots, slots.book.slot_of(name), adapters[name])
    for name in names:
        slots.evict(name)
    assert slots.num_resident == 0
    slots.book.check()
    assert slots.book.free_pages == 9 and slots.num_resident == 0


def test_a_write_that_fails_leaks_nothing(arch, adapters, monkeypatch):
    """A write that raises (here: after zeroing its pages) gives its slot and pages back, and the
    pool goes on serving; the error reaches the caller."""
    slots = pool(arch, 4, 6)
    names = ["p0", "p1"]  # ranks 1 and 3
    slots.activate({names[0]: adapters[names[0]]})
    write = slots._write

    def failing(slot, adapter):
        if adapter is adapters[names[1]]:
            raise RuntimeError("copy failed")
        write(slot, adapter)

    monkeypatch.setattr(slots, "_write", failing)
    with pytest.raises(RuntimeError, match="copy failed"):
        slots.activate({names[0]: adapters[names[0]], names[1]: adapters[names[1]]})
    with pytest.raises(RuntimeError, match="copy failed"):
        slots.write_in_place(names[1], adapters[names[1]])
    assert_consistent(slots)
    assert slots.resident() == [names[0]]
    assert slots.book.free_pages == 6 - slots.pages_for(adapters[names[0]].rank)
    placed = slots.activate({n: adapters[n] for n in ("p2", "p3")})  # ranks 4 and 7: 3 pages
    assert all(held(slots, placed[n], adapters[n]) for n in ("p2", "p3"))


def test_the_tensors_a_captured_graph_reads_keep_their_storage(arch, adapters):
    """A CUDA graph captures the pool's tensors by address (the page table, each layer's A / B
    views, the ranks): loads, activations, evictions and churn write into them, never replace them."""
    slots = pool(arch, 6, 16)

    def addresses() -> list[int]:
        tensors = [slots.pages, slots.ranks, *slots.a.values(), *slots.b.values(), *slots.dora.values(),
                   *slots.proto.values(), *slots.proto_valid.values()]
        for per_layer in (slots.layer_a, slots.layer_b, slots.layer_dora, slots.layer_proto, slots.layer_proto_valid):
            tensors += [t for views in per_layer.values() for t in views]
        return [t.data_ptr() for t in tensors]

    before = addresses()
    names = list(adapters)
    rng = random.Random(5)
    for step in range(20):
        pick = rng.sample(names, 3)
        slots.activate({n: adapters[n] for n in pick})
        slots.write_in_place(rng.choice(names), adapters[rng.choice(names)])
        if step % 4 == 3:
            slots.evict(pick[0])
    assert slots.book.free_pages < slots.num_pages  # the pool was really written
    assert addresses() == before
    assert all(v.data_ptr() == slots.a[g][i].data_ptr() for g, views in slots.layer_a.items()
               for i, v in enumerate(views))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_slot_writes_sync_nothing_and_hold_what_cpu_writes_hold(arch, adapters):
    """On a GPU a slot write is one pinned upload and device-side copies: activations that write
    (the engine thread's path) and loader writes raise nothing under sync debug mode 'error'
    (a copy from pageable memory would wait for every queued step), and the pool then holds
    exactly what the same writes hold on the CPU."""
    cuda = LoraSlots(arch, 6, R, torch.float32, torch.device("cuda"), Metrics(), page_rank=U, num_pages=16)
    cpu = pool(arch, 6, 16)
    names = list(adapters)
    steps = [names[0:3], names[3:6], names[1:4]]
    for slots in (cpu, cuda):
        torch.cuda.set_sync_debug_mode("error" if slots is cuda else "default")
        try:
            for pick in steps:
                slots.activate({n: adapters[n] for n in pick})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        slots.write_in_place(names[7], adapters[names[7]])  # waits for its copy stream: not under 'error'
    torch.cuda.synchronize()
    assert cuda.book.names() == cpu.book.names()
    for name in cpu.book.names():  # what each resident adapter's slot and pages hold (the rest is unwritten)
        slot = cpu.book.slot_of(name)
        assert cuda.book.slot_of(name) == slot
        pages = list(cpu.book.pages(slot))
        assert list(cuda.book.pages(slot)) == pages
        pairs = [(cpu.pages[slot], cuda.pages[slot]), (cpu.ranks[slot], cuda.ranks[slot])]
        for g in cpu.a:
            pairs += [(cpu.a[g][:, pages], cuda.a[g][:, pages]), (cpu.b[g][:, pages], cuda.b[g][:, pages]),
                      (cpu.dora[g][:, slot], cuda.dora[g][:, slot]), (cpu.proto[g][:, slot], cuda.proto[g][:, slot]),
                      (cpu.proto_valid[g][:, slot], cuda.proto_valid[g][:, slot])]
        for on_cpu, on_cuda in pairs:
            assert torch.equal(on_cuda.cpu(), on_cpu), name
