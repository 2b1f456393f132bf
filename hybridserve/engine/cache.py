"""Cache memory: a paged KV cache for attention layers and state slots for Mamba layers.

One block id addresses the same block in every attention layer; one slot id the
same state in every Mamba layer. Both pools are sized from one memory budget:
the hybrid's fixed per-sequence state comes off the top (one slot per batch
seat), the rest becomes KV blocks. `can_allocate` / `allocate` / `free` are the
only ways in and out, so a sequence can never write another's memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.models.decoder import AttentionCacheSpec, MambaCacheSpec


@dataclass(frozen=True)
class CacheLayout:
    block_size: int
    num_blocks: int
    num_slots: int
    bytes_per_block: int   # all attention layers together
    bytes_per_slot: int    # all Mamba layers together

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block + self.num_slots * self.bytes_per_slot


def plan_layout(specs, dtype: torch.dtype, block_size: int, max_num_seqs: int, budget_bytes: int,
                state_dtype: torch.dtype = torch.float32) -> CacheLayout:
    """How many blocks and slots fit `budget_bytes`; raises ValueError naming the fix if none do."""
    per_token = sum(s.bytes_per_token(dtype) for s in specs if isinstance(s, AttentionCacheSpec))
    per_slot = sum(s.bytes_per_seq(dtype, state_dtype) for s in specs if isinstance(s, MambaCacheSpec))
    num_slots = max_num_seqs if per_slot else 0
    left = budget_bytes - num_slots * per_slot
    if left < 0:
        raise ValueError(f"cache_memory_gb too small: {max_num_seqs} Mamba state slots need "
                         f"{num_slots * per_slot / 2**30:.3f} GiB; raise cache_memory_gb or lower max_num_seqs")
    per_block = per_token * block_size
    num_blocks = left // per_block if per_block else 0
    if per_block and num_blocks < 2:
        raise ValueError("cache_memory_gb too small for even two KV blocks; raise cache_memory_gb")
    return CacheLayout(block_size, int(num_blocks), num_slots, per_block, per_slot)


class CacheManager:
    """Owns the cache tensors and the free lists of KV blocks and state slots."""

    def __init__(self, specs, layout: CacheLayout, dtype: torch.dtype, device: str,
                 state_dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.block_size = layout.block_size
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for s in specs:
            if isinstance(s, AttentionCacheSpec):
                shape = (layout.num_blocks, layout.block_size, s.num_kv_heads, s.head_dim)
                self.tensors.append((torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device)))
            else:
                self.tensors.append((torch.zeros((layout.num_slots, *s.conv_shape), dtype=dtype, device=device),
                                     torch.zeros((layout.num_slots, *s.ssm_shape), dtype=state_dtype,
                                                 device=device)))
        self._free_blocks = list(range(layout.num_blocks - 1, -1, -1))
        self._free_slots = list(range(layout.num_slots - 1, -1, -1))

    # ---- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

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
        """Share of cache bytes in use (KV blocks and state slots, weighted by their size)."""
        lay = self.layout
        if lay.total_bytes == 0:
            return 0.0
        used = ((lay.num_blocks - self.num_free_blocks) * lay.bytes_per_block
                + (lay.num_slots - self.num_free_slots) * lay.bytes_per_slot)
        return used / lay.total_bytes

    # ---- check / act pairs
    def can_allocate(self, num_blocks: int, need_slot: bool) -> bool:
        slot_ok = not (need_slot and self.uses_slots) or self.num_free_slots > 0
        return slot_ok and num_blocks <= self.num_free_blocks

    def allocate_blocks(self, n: int) -> list[int]:
        if n > len(self._free_blocks):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free_blocks)} free")
        return [self._free_blocks.pop() for _ in range(n)]

    def allocate_slot(self) -> int:
        if not self.uses_slots:
            return 0  # models without Mamba layers never read the slot
        if not self._free_slots:
            raise RuntimeError("no free state slot")
        return self._free_slots.pop()

    def free(self, blocks: list[int], slot: int | None) -> None:
        self._free_blocks.extend(reversed(blocks))
        if slot is not None and self.uses_slots:
            self._free_slots.append(slot)
