"""The adapter pool's bookkeeping (server/adapters/pool_book.py), pure Python: slots and pages
are never lost or shared, evictions take least recently used adapters outside `busy` only, and
a request for room that cannot be met evicts nothing."""

from __future__ import annotations

import random

import pytest

from server.adapters.pool_book import PoolBook


def test_unpaged_slot_s_is_page_s():
    book = PoolBook(3, 3, paged=False)
    for name in "abc":
        slot, evicted = book.take(frozenset(), 1)
        assert book.pages(slot) == (slot,) and not evicted
        book.commit(name, slot)
    assert book.take(frozenset("abc"), 1) is None
    slot, evicted = book.take(frozenset("bc"), 1)
    assert evicted == [("a", slot)] and book.names() == ["b", "c"]
    with pytest.raises(ValueError, match="one page per slot"):
        PoolBook(3, 5, paged=False)


def test_room_is_made_from_the_least_recently_used_outside_busy_or_not_at_all():
    book = PoolBook(4, 8, paged=True)
    for name, need in (("a", 2), ("b", 3), ("c", 2)):
        slot, _ = book.take(frozenset(), need)
        book.commit(name, slot)
    book.touch("a")  # LRU order now b, c, a; 1 page free
    assert book.take(frozenset({"b", "c", "a"}), 2) is None
    assert book.names() == ["b", "c", "a"] and book.free_pages == 1  # nothing evicted for nothing
    slot, evicted = book.take(frozenset({"b"}), 4)  # c's 2 + the free 1 are not enough: a goes too
    assert [n for n, _ in evicted] == ["c", "a"] and len(book.pages(slot)) == 4
    book.commit("d", slot)
    assert book.names() == ["b", "d"] and book.free_pages == 1
    book.check()


@pytest.mark.parametrize("paged", [True, False])
def test_no_slot_or_page_is_lost_or_shared_through_churn(paged):
    slots, pages = 6, (15 if paged else 6)
    book = PoolBook(slots, pages, paged)
    rng = random.Random(7)
    names = [f"n{i}" for i in range(20)]
    need = {n: rng.randint(1, 4) if paged else 1 for n in names}
    for _ in range(2000):
        name = rng.choice(names)
        action = rng.random()
        if name in book and action < 0.3:
            book.release(book.pop(name))
        elif name in book:
            book.touch(name)
        else:
            busy = frozenset(rng.sample(names, 5))
            taken = book.take(busy, need[name])
            if taken is None:
                continue
            slot, evicted = taken
            assert not {n for n, _ in evicted} & busy
            assert len(book.pages(slot)) == need[name]
            if action < 0.9:
                book.commit(name, slot)
            else:  # a write that failed
                book.release(slot)
        book.check()
        held = [p for n in book.names() for p in book.pages(book.slot_of(n))]
        assert len(held) + book.free_pages == pages
