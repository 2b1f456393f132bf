"""Triton paged decode attention (split-K + reduce, and single split) against the torch reference."""

import pytest
import torch
from kernels_testing import DEVICES, assert_close

from hybridserve.kernels.paged_attention import (
    paged_attention_decode_ref,
    paged_attention_decode_triton,
    plan_splits,
)


def paged(lens, Hq, Hkv, Dh, page, dtype, device, seed=0):
    """Random paged cache with shuffled blocks; tables wider than needed (padded with -1)."""
    g = torch.Generator().manual_seed(seed)
    nb = [(n + page - 1) // page for n in lens]
    num_blocks = sum(nb) + 2
    k_cache = torch.randn(num_blocks, page, Hkv, Dh, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, page, Hkv, Dh, generator=g).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens), max(nb) + 1), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(nb):
        tables[s, :n] = perm[used : used + n].int()
        used += n
    q = torch.randn(len(lens), Hq, Dh, generator=g).to(device, dtype)
    return q, k_cache, v_cache, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens,Hq,Hkv,Dh,page,num_splits",
    [([1, 37, 20], 6, 2, 24, 4, 3), ([50], 4, 4, 16, 8, 1), ([9, 70], 8, 1, 32, 16, None)],
)
@pytest.mark.parametrize("fused_reduce", [True, False])
def test_paged_decode_matches_ref(device, dtype, lens, Hq, Hkv, Dh, page, num_splits, fused_reduce):
    q, k, v, tables, ctx = paged(lens, Hq, Hkv, Dh, page, dtype, device)
    want = paged_attention_decode_ref(q, k, v, tables, ctx, Dh**-0.5)
    for call in range(2):  # the second call finds the split counters reset by the first
        out = paged_attention_decode_triton(
            q, k, v, tables, ctx, Dh**-0.5, num_splits=num_splits, block_n=16, fused_reduce=fused_reduce
        )
        assert_close(f"decode (call {call})", out, want, dtype)


def test_split_plan_covers_the_context_and_fills_the_gpu():
    splits, split_len = plan_splits(batch_programs=8, max_ctx=4096, num_sms=132, block_n=64)
    assert splits * split_len >= 4096 and (splits - 1) * split_len < 4096
    assert splits * 8 >= 132  # small batch: the sequence is split
    assert plan_splits(batch_programs=1024, max_ctx=4096, num_sms=132, block_n=64)[0] == 1
