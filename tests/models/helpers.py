"""Test helpers: run the native model over a hand-built cache, one chunk at a time."""
import torch

from hybridserve.engine.cache import CacheManager, plan_layout
from hybridserve.models.batch import ForwardBatch


def make_cache(model, num_seqs=4, block_size=4, budget_mb=8):
    dtype = next(model.parameters()).dtype
    specs = model.cache_specs()
    layout = plan_layout(specs, dtype, block_size, num_seqs, budget_mb * 2**20)
    return CacheManager(specs, layout, dtype, "cpu")


def run_chunk(model, cache, tokens, start, n, block_ids, slot):
    """Feed tokens[start:start+n] of one sequence; logits [n, V] at every fed position."""
    bs = cache.block_size
    need = -(-(start + n) // bs) - len(block_ids)
    if need > 0:
        block_ids += cache.allocate_blocks(need)
    pos = torch.arange(start, start + n)
    table = torch.tensor([block_ids or [0]], dtype=torch.int32)
    decode = n == 1 and start > 0
    batch = ForwardBatch(
        input_ids=torch.tensor(tokens[start:start + n]), positions=pos, num_decodes=int(decode),
        cu_seqlens=torch.tensor([0, n]), context_lens=torch.tensor([start + n], dtype=torch.int32),
        block_tables=table, slot_mapping=(table[0, pos // bs].long() * bs + pos % bs) if block_ids else pos * 0,
        state_indices=torch.tensor([slot]), has_initial_state=torch.tensor([start > 0]),
        logits_indices=torch.arange(n),
    )
    return model(batch, cache.tensors)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
