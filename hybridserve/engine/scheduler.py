"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running sequences first (decodes cost one token; unfinished prefills
take the next chunk), then waiting ones join while the token budget, the batch
seats and the cache allow. When a running sequence needs a KV block and none is
free, the newest running sequence is preempted (its cache freed, to be
recomputed later), so memory pressure delays work instead of failing it.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from hybridserve.engine.cache import CacheManager
from hybridserve.engine.sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    entries: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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
            n = min(seq.num_uncomputed, budget)
            need = self.cache.blocks_needed(seq.num_computed + n, len(seq.block_ids))
            if not self.cache.can_allocate(need, need_slot=True):
                break
            self.waiting.popleft()
            seq.slot = self.cache.allocate_slot()
            seq.block_ids += self.cache.allocate_blocks(need)
            seq.status = SeqStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            out.entries.append((seq, n))
            budget -= n
        return out

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
        """Drop a finished (or aborted) sequence and free its blocks and slot at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
