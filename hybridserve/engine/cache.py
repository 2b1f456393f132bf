"""Cache memory: paged KV blocks for attention layers, state slots for Mamba layers, and the prefix cache.

One block id addresses the same block in every attention layer; one slot id the
same row of every Mamba layer's state. Both come from one memory budget: the
hybrid's fixed per-sequence state comes off the top (one seat per batch slot),
then a share of the rest becomes Mamba snapshot slots, the rest KV blocks.

Prefix caching (see block_pool.py, state_pool.py): a prompt may start from cached
KV blocks and, for a hybrid, from a snapshot of every Mamba layer at the same
block-aligned position; `find_prefix` answers how much of a prompt is cached.
`can_allocate` / `allocate_*` / `free` are the only ways in and out of live
memory, so a sequence never writes memory another sequence can read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.block_pool import BlockPool
from hybridserve.engine.state_pool import StatePool
from hybridserve.models.decoder import AttentionCacheSpec, MambaCacheSpec


@dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_slots: int          # seats: one per running sequence
    bytes_per_block: int    # all attention layers together
    bytes_per_slot: int     # all Mamba layers together
    num_snapshots: int = 0  # Mamba state snapshots of the prefix cache

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + (self.num_slots + self.num_snapshots) * self.bytes_per_slot


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix: `num_tokens` = len(blocks) * block_size, and the snapshot at that position."""

    num_tokens: int
    blocks: list[int]
    snapshot: int | None  # Mamba snapshot slot to copy into the seat; None for models without Mamba


NO_HIT = PrefixHit(0, [], None)


def plan_layout(specs, dtype: torch.dtype, block_size: int, max_num_seqs: int, budget_bytes: int,
                state_dtype: torch.dtype = torch.float32, snapshot_share: float = 0.0) -> CacheLayout:
    """How many blocks and slots fit `budget_bytes`; raises ValueError naming the fix if none do."""
    per_token = sum(s.bytes_per_token(dtype) for s in specs if isinstance(s, AttentionCacheSpec))
    per_slot = sum(s.bytes_per_seq(dtype, state_dtype) for s in specs if isinstance(s, MambaCacheSpec))
    num_slots = max_num_seqs if per_slot else 0
    left = budget_bytes - num_slots * per_slot
    if left < 0:
        raise ValueError(f"cache_memory_gb too small: {max_num_seqs} Mamba state slots need "
                         f"{num_slots * per_slot / 2**30:.3f} GiB; raise cache_memory_gb or lower max_num_seqs")
    num_snapshots = int(left * snapshot_share) // per_slot if per_slot else 0
    left -= num_snapshots * per_slot
    per_block = per_token * block_size
    num_blocks = left // per_block if per_block else 0
    if per_block and num_blocks < 2:
        raise ValueError("cache_memory_gb too small for even two KV blocks; raise cache_memory_gb")
    return CacheLayout(block_size, int(num_blocks), num_slots, per_block, per_slot, int(num_snapshots))


class CacheManager:
    """Owns the cache tensors, the block pool and the state pool."""

    def __init__(self, specs, layout: CacheLayout, dtype: torch.dtype, device: str,
                 state_dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.block_size = layout.block_size
        rows = layout.num_slots + layout.num_snapshots
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mamba_layers: list[int] = []
        for i, s in enumerate(specs):
            if isinstance(s, AttentionCacheSpec):
                shape = (layout.num_blocks, layout.block_size, s.num_kv_heads, s.head_dim)
                self.tensors.append((torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device)))
            else:
                self._mamba_layers.append(i)
                self.tensors.append((torch.zeros((rows, *s.conv_shape), dtype=dtype, device=device),
                                     torch.zeros((rows, *s.ssm_shape), dtype=state_dtype, device=device)))
        self.blocks = BlockPool(layout.num_blocks)
        self.states = StatePool(layout.num_slots, layout.num_snapshots)

    # ---- queries
    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_free_slots(self) -> int:
        return self.states.num_free_seats

    @property
    def uses_blocks(self) -> bool:
        return self.layout.bytes_per_block > 0

    @property
    def uses_slots(self) -> bool:
        return self.layout.bytes_per_slot > 0

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        if not self.uses_blocks:
            return 0
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def usage(self) -> float:
        """Share of cache bytes holding live sequences (cached-but-evictable memory counts as free)."""
        lay = self.layout
        if lay.total_bytes == 0:
            return 0.0
        used = ((lay.num_blocks - self.num_free_blocks) * lay.bytes_per_block
                + (lay.num_slots - self.num_free_slots) * lay.bytes_per_slot)
        return used / lay.total_bytes

    # ---- check / act pairs
    def can_allocate(self, num_blocks: int, need_slot: bool, hit: PrefixHit = NO_HIT) -> bool:
        """Room for `num_blocks` new blocks (+ a seat) after taking the hit's blocks out of the free queue."""
        slot_ok = not (need_slot and self.uses_slots) or self.num_free_slots > 0
        return slot_ok and num_blocks + self.blocks.num_free_among(hit.blocks) <= self.num_free_blocks

    def allocate_blocks(self, n: int) -> list[int]:
        return self.blocks.allocate(n)

    def allocate_slot(self) -> int:
        if not self.uses_slots:
            return 0  # models without Mamba layers never read the slot
        return self.states.allocate_seat()

    def take_hit(self, hit: PrefixHit) -> list[int]:
        """Reference the hit's blocks; returns them (the start of the sequence's block table)."""
        self.blocks.share(hit.blocks)
        return list(hit.blocks)

    def free(self, blocks: list[int], slot: int | None) -> None:
        self.blocks.release(blocks)
        if slot is not None and self.uses_slots:
            self.states.free_seat(slot)

    # ---- the prefix cache
    def find_prefix(self, hashes: list[bytes]) -> PrefixHit:
        """The longest cached prefix named by leading `hashes` (one per full block) usable as a start.

        Attention layers need every block; Mamba layers need a snapshot at the end of the
        prefix, so a hybrid's hit is the longest block run that also ends at a snapshot."""
        blocks: list[int] = []
        if self.uses_blocks:
            for h in hashes:
                b = self.blocks.cached(h)
                if b is None:
                    break
                blocks.append(b)
            n = len(blocks)
        else:
            n = len(hashes)
        if not self.uses_slots:
            return PrefixHit(n * self.block_size, blocks, None) if n else NO_HIT
        for k in range(n, 0, -1):
            snap = self.states.lookup(hashes[k - 1])
            if snap is not None:
                return PrefixHit(k * self.block_size, blocks[:k], snap)
        return NO_HIT

    def commit_block(self, block: int, h: bytes) -> None:
        self.blocks.commit(block, h)

    @property
    def num_cached_blocks(self) -> int:
        return self.blocks.num_cached

    @property
    def num_cached_snapshots(self) -> int:
        return self.states.num_cached

    def copy_states(self, src: list[int], dst: list[int]) -> None:
        """Copy state rows src[i] -> dst[i] in every Mamba layer (a snapshot into a seat, or back)."""
        if not src:
            return
        dev = self.tensors[self._mamba_layers[0]][0].device
        s = torch.tensor(src, dtype=torch.int64, device=dev)
        d = torch.tensor(dst, dtype=torch.int64, device=dev)
        for i in self._mamba_layers:
            for t in self.tensors[i]:
                t.index_copy_(0, d, t.index_select(0, s))

    def clear_prefix_cache(self) -> int:
        """Forget every cached block and snapshot no sequence holds; returns how many were dropped."""
        return self.blocks.clear_cache() + self.states.clear_cache()
