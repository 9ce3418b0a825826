"""Who holds what in the device adapter pool: slots and rank-unit pages, least recently used
first. Pure bookkeeping (no tensors, no locks): the pool (slots.py) asks it for room, writes
the weights, and tells it when an adapter becomes resident or goes.

An adapter takes one slot (its handle) and `need` pages anywhere in the pool. Unpaged
(`paged` False), slot s's one page is page s, and there are as many pages as slots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class PoolBook:
    def __init__(self, num_slots: int, num_pages: int, paged: bool):
        if not paged and num_pages != num_slots:
            raise ValueError(f"an unpaged pool has one page per slot, not {num_pages} for {num_slots}")
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.paged = paged
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # resident adapters, least recently used first
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest slot first
        self._free_pages = list(range(num_pages - 1, -1, -1)) if paged else []
        self._pages: list[tuple[int, ...]] = [()] * num_slots  # each slot's pages, in rank order

    def __contains__(self, name: Hashable) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, name: Hashable) -> int:
        return self._slot_of[name]

    def names(self) -> list[Hashable]:
        """The resident adapters, least recently used first."""
        return list(self._slot_of)

    def pages(self, slot: int) -> tuple[int, ...]:
        """The pages of `slot` (taken or resident), in rank order."""
        return self._pages[slot]

    @property
    def free_pages(self) -> int:
        return len(self._free_pages) if self.paged else len(self._free)

    def touch(self, name: Hashable) -> None:
        """`name` was used: the most recently used now."""
        self._slot_of.move_to_end(name)

    def take(self, busy: frozenset[Hashable], need: int) -> tuple[int, list[tuple[Hashable, int]]] | None:
        """A free slot holding `need` free pages (see `pages`), evicting the least recently used
        adapters not in `busy` until there are -> (slot, the evicted (name, slot) pairs); None,
        and nothing evicted, if even evicting all of those would not make room. The slot is
        neither free nor resident until `commit` or `release`."""
        slots, pages = len(self._free), self.free_pages
        victims = []
        for name, slot in self._slot_of.items():  # least recently used first
            if slots and pages >= need:
                break
            if name not in busy:
                victims.append((name, slot))
                slots, pages = slots + 1, pages + len(self._pages[slot])
        if not slots or pages < need:
            return None
        for name, slot in victims:
            del self._slot_of[name]
            self.release(slot)
        slot = self._free.pop()
        self._pages[slot] = tuple(self._free_pages.pop() for _ in range(need)) if self.paged else (slot,)
        return slot, victims

    def commit(self, name: Hashable, slot: int) -> None:
        """A taken slot now holds `name` (the most recently used)."""
        self._slot_of[name] = slot

    def pop(self, name: Hashable) -> int | None:
        """Forget `name` -> its slot (to `release`), or None if it is not resident."""
        return self._slot_of.pop(name, None)

    def release(self, slot: int) -> None:
        """A slot (and its pages) that no adapter holds is free again."""
        self._free.append(slot)
        if self.paged:
            self._free_pages.extend(self._pages[slot])
        self._pages[slot] = ()

    def check(self) -> None:
        """Raise AssertionError unless every slot and page is free or held exactly once (tests)."""
        held = list(self._slot_of.values())
        used = [p for s in held for p in self._pages[s]]
        assert sorted(held + self._free) == list(range(self.num_slots)), "slots lost or shared"
        if self.paged:
            assert sorted(used + self._free_pages) == list(range(self.num_pages)), "pages lost or shared"
