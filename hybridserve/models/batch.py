"""`ForwardBatch`: one engine step's tokens, packed flat, plus the cache addressing.

The data path: the scheduler (CPU, Python) picks sequences; the model runner
turns them into this batch of tensors on the model's device; the model reads and
writes the caches in place through it. Decode sequences come first (one token
each, tokens [0, num_decodes)), then prefill chunks (several tokens each).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64, position of each token in its sequence
    num_decodes: int                 # sequences [0, num_decodes) are single-token decodes
    cu_seqlens: torch.Tensor         # [S+1] int64, token offsets of each sequence in T
    context_lens: torch.Tensor       # [S] int32, cached tokens after this step (incl. new ones)
    block_tables: torch.Tensor       # [S, max_blocks] int32, KV blocks of each sequence
    slot_mapping: torch.Tensor       # [T] int64, cache slot (block * block_size + offset) per token
    state_indices: torch.Tensor      # [S] int64, Mamba state slot of each sequence
    has_initial_state: torch.Tensor  # [S] bool, sequence has cached tokens from earlier steps
    logits_indices: torch.Tensor     # [S] int64, index in T of each sequence's last token
    max_context_len: int = 0         # host copy of max(context_lens): sizes kernel grids without a sync
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [T, 1, Dh]; set by the model per step
    # Mamba snapshots inside prefill chunks (host lists, one entry per snapshot, ordered by row then offset):
    # keep the state after prefill token `snapshot_offsets[k]` (counted from the first prefill token,
    # exclusive end) of prefill row `snapshot_rows[k]` in state slot `snapshot_slots[k]`
    snapshot_rows: list[int] = field(default_factory=list)
    snapshot_offsets: list[int] = field(default_factory=list)
    snapshot_slots: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decodes

    def prefill_cu_seqlens(self) -> torch.Tensor:
        """[P+1] token offsets of the prefill sequences, relative to the first prefill token."""
        return self.cu_seqlens[self.num_decodes:] - self.num_decodes
