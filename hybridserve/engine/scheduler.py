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
        self.waiting: deque[Sequence] = deque()        # interactive
        self.waiting_batch: deque[Sequence] = deque()  # batch: admitted only after interactive work
        self.running: list[Sequence] = []
        self._budget = 0  # tokens left in the step being scheduled
        self.prefix_queries = 0  # prompt tokens looked up at first admission
        self.prefix_hits = 0     # of which found cached

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.waiting_batch) + len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_batch)

    def schedule(self) -> SchedulerOutput:
        """Interactive work first: its running sequences, then its waiting ones (preempting batch
        sequences for seats or memory they need), then running batch work, then waiting batch work."""
        out = SchedulerOutput()
        self._budget = self.max_num_batched_tokens
        self._make_room(out)
        for batch in (False, True):
            self._run_running(batch, out)
            self._admit_waiting(self.waiting_batch if batch else self.waiting, out)
        if self.prefix_caching and self.cache.uses_slots:
            self._plan_snapshots(out)
        return out

    def _run_running(self, batch: bool, out: SchedulerOutput) -> None:
        for seq in [s for s in self.running if s.is_batch == batch]:
            if self._budget <= 0:
                return
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted by an earlier sequence of this step
            n = min(seq.num_uncomputed, self._budget)
            if self._reserve(seq, n, out):
                out.entries.append((seq, n))
                self._budget -= n

    def _admit_waiting(self, queue: deque[Sequence], out: SchedulerOutput) -> None:
        while queue and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = queue[0]
            hit = self._lookup(seq)
            n = min(seq.num_tokens - hit.num_tokens, self._budget)
            need = self.cache.blocks_needed(hit.num_tokens + n, len(hit.blocks))
            if not self.cache.can_allocate(need, need_slot=True, hit=hit):
                return
            queue.popleft()
            self._admit(seq, hit, need, out)
            out.entries.append((seq, n))
            self._budget -= n

    def _make_room(self, out: SchedulerOutput) -> None:
        """An interactive request is waiting for a seat or memory that running batch work holds:
        preempt batch sequences, newest first, until it fits (they resume from the cache later)."""
        batch = [s for s in self.running if s.is_batch]
        if not self.waiting or not batch or len(self.running) - len(batch) >= self.max_num_seqs:
            return
        head = self.waiting[0]
        hit = self._lookup(head)
        n = min(head.num_tokens - hit.num_tokens, self.max_num_batched_tokens)
        need = self.cache.blocks_needed(hit.num_tokens + n, len(hit.blocks))
        refs = self.cache.blocks.ref_count
        freeable = sum(1 for s in batch for b in s.block_ids if refs[b] == 1)
        if need + self.cache.blocks.num_free_among(hit.blocks) > self.cache.num_free_blocks + freeable:
            return  # preempting batch work would not let it in: leave that work running
        while batch and (len(self.running) >= self.max_num_seqs
                         or not self.cache.can_allocate(need, need_slot=True, hit=hit)):
            self._preempt(batch.pop())
            out.num_preempted += 1

    def add(self, seq: Sequence) -> None:
        (self.waiting_batch if seq.is_batch else self.waiting).append(seq)

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
        if seq.metrics.first_scheduled_time is None:  # a preempted sequence's second admission is no query
            seq.metrics.first_scheduled_time = time.time()
            seq.metrics.cached_tokens = hit.num_tokens
            out.cached.append((seq, hit.num_tokens))
            if self.prefix_caching:
                self.prefix_queries += len(seq.prompt_ids)
                self.prefix_hits += hit.num_tokens
        seq.status = SeqStatus.RUNNING
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
        """Give `seq` the blocks for n more tokens, preempting others if needed: batch sequences
        first, newest first, never one already scheduled this step, and batch work never preempts
        interactive work. False when `seq` itself had to go."""
        need = self.cache.blocks_needed(seq.num_computed + n, len(seq.block_ids))
        while not self.cache.can_allocate(need, need_slot=False):
            victim = self._victim(seq, out)
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        seq.block_ids += self.cache.allocate_blocks(need)
        return True

    def _victim(self, seq: Sequence, out: SchedulerOutput) -> Sequence:
        scheduled = {id(s) for s, _ in out.entries}
        others = [s for s in self.running if s is not seq and id(s) not in scheduled]
        batch = [s for s in others if s.is_batch]
        if batch:
            return batch[-1]
        return others[-1] if others and not seq.is_batch else seq

    def _preempt(self, seq: Sequence) -> None:
        log.info("request %s preempted (%s); it will be recomputed", seq.request_id,
                 "batch work yields" if seq.is_batch else "cache full")
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        (self.waiting_batch if seq.is_batch else self.waiting).appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.cache.free(seq.block_ids, seq.slot)
        seq.block_ids, seq.slot = [], None

    def finish(self, seq: Sequence) -> None:
        """Drop a finished (or aborted) sequence and its references to blocks and its seat at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.waiting_batch:
            self.waiting_batch.remove(seq)
        self._release(seq)
