"""Turns a `SchedulerOutput` into a `ForwardBatch`, runs the model, and samples.

The runner is the only engine module that touches tensors: it copies the Mamba
snapshots of prefix hits into their seats, packs the scheduled tokens (decodes
first), runs the model over the cache tensors, keeps the planned snapshots, and
returns sampled tokens for the sequences whose chunk reached their last token.
It changes no counter: the scheduler updates its sequences from the output.
"""
from __future__ import annotations

import torch

from hybridserve.engine.cache import CacheManager
from hybridserve.engine.sampler import Sampler
from hybridserve.engine.scheduler import SchedulerOutput, Snapshot
from hybridserve.models.batch import ForwardBatch


class ModelRunner:
    def __init__(self, model, cache: CacheManager, device: str, seed: int = 0):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.sampler = Sampler(seed)

    def prepare(self, entries, inner: list[Snapshot] = ()) -> ForwardBatch:
        """Pack (sequence, num_tokens) entries, which must already be ordered decodes first, with the
        snapshots strictly inside a prefill chunk (the Mamba layers keep them from the scan)."""
        if not inner and all(n == 1 and seq.num_computed > 0 for seq, n in entries):
            return self.prepare_decode([seq for seq, _ in entries])
        return self.prepare_mixed(entries, inner)

    def prepare_mixed(self, entries, inner: list[Snapshot] = ()) -> ForwardBatch:
        """`prepare` for any step (prefill chunks, decodes, snapshots), in torch ops."""
        bs = self.cache.block_size
        ids, starts, lens, ctx = [], [], [], []
        for seq, n in entries:
            c = seq.num_computed
            ids += seq.token_slice(c, c + n)
            starts.append(c)
            lens.append(n)
            ctx.append(c + n)
        num_decodes = sum(1 for seq, n in entries if n == 1 and seq.num_computed > 0)
        max_blocks = max(1, max(len(seq.block_ids) for seq, _ in entries))
        tables = torch.zeros((len(entries), max_blocks), dtype=torch.int32)
        for row, (seq, _) in enumerate(entries):
            if seq.block_ids:
                tables[row, :len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        cu = torch.zeros(len(entries) + 1, dtype=torch.int64)
        cu[1:] = lens_t.cumsum(0)
        seq_of_token = torch.repeat_interleave(torch.arange(len(entries)), lens_t)
        positions = torch.arange(int(cu[-1])) - cu[:-1][seq_of_token] + torch.tensor(starts)[seq_of_token]
        if self.cache.uses_blocks:
            block = tables[seq_of_token, positions // bs].long()
            slot_mapping = block * bs + positions % bs
        else:
            slot_mapping = torch.zeros_like(positions)
        slots = [seq.slot if seq.slot is not None else 0 for seq, _ in entries]
        row_of = {id(seq): row for row, (seq, _) in enumerate(entries)}
        inner = sorted(inner, key=lambda s: (row_of[id(s.seq)], s.position))
        prefill_start = int(cu[num_decodes])
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=positions.to(dev), num_decodes=num_decodes, cu_seqlens=cu.to(dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), block_tables=tables.to(dev),
            slot_mapping=slot_mapping.to(dev), state_indices=torch.tensor(slots, dtype=torch.int64, device=dev),
            has_initial_state=torch.tensor([s > 0 for s in starts], dtype=torch.bool, device=dev),
            logits_indices=(cu[1:] - 1).to(dev), max_context_len=max(ctx),
            snapshot_rows=[row_of[id(s.seq)] - num_decodes for s in inner],
            snapshot_offsets=[int(cu[row_of[id(s.seq)]]) - prefill_start + s.position - s.seq.num_computed
                              for s in inner],
            snapshot_slots=[s.slot for s in inner],
        )

    def prepare_decode(self, seqs) -> ForwardBatch:
        """`prepare` for a step of decodes only (one token per sequence), built from host lists: the
        same batch in a handful of tensor constructions instead of ~25 torch ops, which at batch 1
        were ~5 % of a small model's step."""
        bs, n = self.cache.block_size, len(seqs)
        pos = [seq.num_computed for seq in seqs]
        width = max(1, max(len(seq.block_ids) for seq in seqs))
        if self.cache.uses_blocks:
            slot_mapping = [seq.block_ids[p // bs] * bs + p % bs for seq, p in zip(seqs, pos)]
        else:
            slot_mapping = [0] * n
        dev, rows = self.device, torch.arange(n)
        return ForwardBatch(
            input_ids=torch.tensor([seq.token_slice(p, p + 1)[0] for seq, p in zip(seqs, pos)], device=dev),
            positions=torch.tensor(pos, device=dev), num_decodes=n, cu_seqlens=torch.arange(n + 1, device=dev),
            context_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32, device=dev),
            block_tables=torch.tensor([seq.block_ids + [0] * (width - len(seq.block_ids)) for seq in seqs],
                                      dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=dev),
            state_indices=torch.tensor([seq.slot if seq.slot is not None else 0 for seq in seqs], device=dev),
            has_initial_state=torch.ones(n, dtype=torch.bool, device=dev), logits_indices=rows.to(dev),
            max_context_len=max(pos) + 1,
        )

    def run(self, sched: SchedulerOutput):
        """Run one step; returns [(seq, token, logprob)] for sequences that produced a token."""
        if sched.state_copies:
            self.cache.copy_states(*map(list, zip(*sched.state_copies)))
        # decodes first, in seat order (a hybrid's CPU decode updates a run of consecutive seats in place)
        entries = sorted(sched.entries, key=lambda e: (0, e[0].slot or 0) if e[1] == 1 and e[0].num_computed > 0
                         else (1, 0))
        end_of = {id(seq): seq.num_computed + n for seq, n in entries}
        inner = [s for s in sched.snapshots if s.position < end_of[id(s.seq)]]
        ends = [(s.seq.slot, s.slot) for s in sched.snapshots if s.position == end_of[id(s.seq)]]
        logits = self.model(self.prepare(entries, inner), self.cache.tensors)
        if ends:  # snapshots at a chunk's end: the seat holds that state once the step ran
            self.cache.copy_states(*map(list, zip(*ends)))
        done = [i for i, (seq, n) in enumerate(entries) if seq.num_computed + n == seq.num_tokens]
        if not done:
            return []
        seqs = [entries[i][0] for i in done]
        tokens, records = self.sampler(logits[done], seqs)
        return list(zip(seqs, tokens, records))
