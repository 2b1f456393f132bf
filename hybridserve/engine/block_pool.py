"""KV blocks with content hashes and reference counts: the attention half of the prefix cache.

A full block is named by a chained hash: blake2b of its parent block's hash, its
token ids and the engine's salt, so equal hashes mean equal prefixes, not just
equal blocks. Sequences share a cached block read-only by holding a reference.
A block whose last reference goes stays findable by its hash and joins the free
queue; it is evicted (its hash forgotten) only when the block is handed out
again, least recently freed first. Free blocks, evictable ones included, are
what admission counts.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_hashes(tokens: list[int], block_size: int, salt: bytes, known: list[bytes]) -> list[bytes]:
    """Chained hashes of every full block of `tokens`; extends `known` (a prefix of them) in place."""
    for i in range(len(known), len(tokens) // block_size):
        parent = known[i - 1] if i else salt
        ids = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        known.append(hashlib.blake2b(parent + ids, digest_size=16).digest())
    return known


class BlockPool:
    """Reference counts, hashes and the LRU free queue of `num_blocks` KV blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # ---- queries
    @property
    def num_free(self) -> int:
        """Blocks with no reference: never used, or cached and evictable."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def cached(self, h: bytes) -> int | None:
        return self.by_hash.get(h)

    def num_free_among(self, blocks: list[int]) -> int:
        return sum(1 for b in blocks if self.ref_count[b] == 0)

    # ---- check / act
    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks (ref 1), evicting the least recently freed cached ones first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self.ref_count[b] = 1
            out.append(b)
        return out

    def share(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); they leave the free queue."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self._free[b]
            self.ref_count[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each; the tail of a sequence is freed first so it is evicted first."""
        for b in reversed(blocks):
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None

    def commit(self, block: int, h: bytes) -> None:
        """Name a block that just became full; a hash already cached keeps its first block."""
        if self.hash_of[block] is None and h not in self.by_hash:
            self.hash_of[block] = h
            self.by_hash[h] = block

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None:
            del self.by_hash[h]
            self.hash_of[b] = None

    def clear_cache(self) -> int:
        """Forget every hash of an unreferenced block (the cache, not live data); returns how many."""
        gone = [b for b in self._free if self.hash_of[b] is not None]
        for b in gone:
            self._forget(b)
        return len(gone)
