"""Mamba state slots: one seat per running sequence plus snapshot slots, the SSM half of the prefix cache.

Slot ids index the same row of every Mamba layer's conv and SSM state tensors:
seats are rows [0, num_seats), snapshots rows [num_seats, num_seats + num_snapshots).
A snapshot holds every Mamba layer's state exactly at a block-aligned position p of
some token prefix and is named by that prefix's chained block hash; using it means
copying its row into the sequence's seat, so snapshots are never written by a
sequence and need no reference counts. Snapshots are recycled least recently used.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict


class StatePool:
    def __init__(self, num_seats: int, num_snapshots: int):
        self.num_seats = num_seats
        self.num_snapshots = num_snapshots
        self._free_seats = list(range(num_seats))  # a heap: the lowest free seat is taken first
        self._lru: OrderedDict[int, bytes | None] = OrderedDict(
            (num_seats + i, None) for i in range(num_snapshots))  # slot -> name, oldest first
        self._by_hash: dict[bytes, int] = {}

    # ---- seats
    @property
    def num_free_seats(self) -> int:
        return len(self._free_seats)

    def allocate_seat(self) -> int:
        """The lowest free seat: the running sequences then hold seats 0..n-1 (one run the CPU decode
        updates in place, with the decode rows in seat order) unless some finished in between."""
        if not self._free_seats:
            raise RuntimeError("no free state slot")
        return heapq.heappop(self._free_seats)

    def free_seat(self, slot: int) -> None:
        if not 0 <= slot < self.num_seats or slot in self._free_seats:
            raise RuntimeError(f"state slot {slot} freed twice or never taken")
        heapq.heappush(self._free_seats, slot)

    # ---- snapshots
    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def lookup(self, h: bytes) -> int | None:
        """The snapshot slot named `h`, marked recently used; None if there is none."""
        slot = self._by_hash.get(h)
        if slot is not None:
            self._lru.move_to_end(slot)
        return slot

    def claim(self) -> int | None:
        """The least recently used snapshot slot, unnamed, to be written this step; None if no pool."""
        if not self._lru:
            return None
        slot, name = next(iter(self._lru.items()))
        if name is not None:
            del self._by_hash[name]
        self._lru[slot] = None
        self._lru.move_to_end(slot)
        return slot

    def name(self, slot: int, h: bytes) -> None:
        """Publish a written snapshot under its prefix hash (after the step that wrote it)."""
        if h in self._by_hash:  # an equal snapshot was published first: recycle this one first
            self._lru.move_to_end(slot, last=False)
            return
        self._lru[slot] = h
        self._by_hash[h] = slot

    def release_unnamed(self, slot: int) -> None:
        """A claimed slot that was not written: recycle it first."""
        if self._lru.get(slot) is None:
            self._lru.move_to_end(slot, last=False)

    def clear_cache(self) -> int:
        n = len(self._by_hash)
        for slot in self._by_hash.values():
            self._lru[slot] = None
        self._by_hash.clear()
        return n
