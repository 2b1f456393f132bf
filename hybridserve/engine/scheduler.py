"""Continuous batching with chunked prefill under a per-step token budget, and the prefix cache's policy.

Each step: running sequences first (decodes cost one token; unfinished prefills
take the next chunk), then waiting ones join while the token budget, the batch
seats and the cache allow. A joining sequence starts after its longest cached
prefix (recorded in the output, with the snapshot copy a hybrid needs). When a
running sequence needs a KV block and none is free, the newest running sequence
is preempted (its references dropped, to be recomputed — mostly from the cache —
later), so memory pressure delays work instead of failing it.

Hybrids also plan where this step's Mamba states are kept as snapshots: every
`snapshot_interval` tokens, the last block boundary of the prompt, and each block
boundary of the output (so a conversation's next turn finds its previous one).
After the model ran, `update_from_output` advances the counters, names the
blocks that became full and publishes the snapshots written.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from hybridserve.engine.cache import NO_HIT, CacheManager, PrefixHit
from hybridserve.engine.sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Keep `seq`'s Mamba state at `position` (in (start, start + n] of this step) in snapshot `slot`."""

    seq: Sequence
    position: int
    slot: int
    name: bytes


@dataclass
class SchedulerOutput:
    entries: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    num_preempted: int = 0
    cached: list[tuple[Sequence, int]] = field(default_factory=list)  # joined: prompt tokens found cached
    state_copies: list[tuple[int, int]] = field(default_factory=list)  # (snapshot slot, seat) before the step
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_caching: bool = False, snapshot_interval: int | None = None):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_caching = prefix_caching
        bs = cache.block_size
        self.snapshot_interval = snapshot_interval or bs
        if self.snapshot_interval % bs:
            raise ValueError(f"mamba_snapshot_interval ({self.snapshot_interval}) must be a multiple of "
                             f"block_size ({bs})")
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_queries = 0  # prompt tokens looked up at first admission
        self.prefix_hits = 0     # of which found cached

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, n, out):
                continue  # seq itself was preempted; the list shrank
            out.entries.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self._lookup(seq)
            n = min(seq.num_tokens - hit.num_tokens, budget)
            need = self.cache.blocks_needed(hit.num_tokens + n, len(hit.blocks))
            if not self.cache.can_allocate(need, need_slot=True, hit=hit):
                break
            self.waiting.popleft()
            self._admit(seq, hit, need, out)
            out.entries.append((seq, n))
            budget -= n
        if self.prefix_caching and self.cache.uses_slots:
            self._plan_snapshots(out)
        return out

    def _lookup(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of seq's tokens, leaving at least one token to compute."""
        if not self.prefix_caching:
            return NO_HIT
        bs = self.cache.block_size
        return self.cache.find_prefix(seq.block_hashes((seq.num_tokens - 1) // bs, bs))

    def _admit(self, seq: Sequence, hit: PrefixHit, need: int, out: SchedulerOutput) -> None:
        seq.block_ids = self.cache.take_hit(hit) + self.cache.allocate_blocks(need)
        seq.slot = self.cache.allocate_slot()
        seq.num_computed = hit.num_tokens
        seq.num_named_blocks = len(hit.blocks)
        if hit.snapshot is not None:
            out.state_copies.append((hit.snapshot, seq.slot))
        if seq.num_cached_tokens is None:  # a preempted sequence's second admission is not a query
            seq.num_cached_tokens = seq.metrics.cached_tokens = hit.num_tokens
            out.cached.append((seq, hit.num_tokens))
            if self.prefix_caching:
                self.prefix_queries += len(seq.prompt_ids)
                self.prefix_hits += hit.num_tokens
        seq.status = SeqStatus.RUNNING
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = time.time()
        self.running.append(seq)

    def _plan_snapshots(self, out: SchedulerOutput) -> None:
        bs, every = self.cache.block_size, self.snapshot_interval
        for seq, n in out.entries:
            start, end = seq.num_computed, seq.num_computed + n
            prompt_end = len(seq.prompt_ids) // bs * bs
            first = (start // bs + 1) * bs
            for p in range(first, end + 1, bs):
                if p % every and p != prompt_end and p <= len(seq.prompt_ids):
                    continue
                name = seq.block_hashes(p // bs, bs)[-1]
                if self.cache.states.lookup(name) is not None:
                    continue  # already kept (and now marked recently used)
                slot = self.cache.states.claim()
                if slot is None:
                    return
                out.snapshots.append(Snapshot(seq, p, slot, name))

    def update_from_output(self, out: SchedulerOutput) -> None:
        """After the model ran `out`: advance counters, name full blocks, publish snapshots."""
        bs = self.cache.block_size
        for seq, n in out.entries:
            seq.num_computed += n
            if self.prefix_caching and self.cache.uses_blocks:
                full = seq.num_computed // bs
                if full > seq.num_named_blocks:
                    hashes = seq.block_hashes(full, bs)
                    for b in range(seq.num_named_blocks, full):
                        self.cache.commit_block(seq.block_ids[b], hashes[b])
                    seq.num_named_blocks = full
        for snap in out.snapshots:
            self.cache.states.name(snap.slot, snap.name)

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Give `seq` the blocks for n more tokens, preempting the newest sequences if needed."""
        need = self.cache.blocks_needed(seq.num_computed + n, len(seq.block_ids))
        while not self.cache.can_allocate(need, need_slot=False):
            victim = self.running[-1]
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        seq.block_ids += self.cache.allocate_blocks(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.info("request %s preempted (cache full); it will be recomputed", seq.request_id)
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.cache.free(seq.block_ids, seq.slot)
        seq.block_ids, seq.slot = [], None

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence and its references to blocks and its seat at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
