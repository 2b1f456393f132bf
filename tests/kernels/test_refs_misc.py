"""Conv1d, paged attention and gated RMSNorm torch references against plain loops / Hugging Face."""

import pytest
import torch
from kernels_testing import assert_close, attention_naive, conv_naive

from hybridserve.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_ref
from hybridserve.kernels.paged_attention import (
    paged_attention_decode_ref,
    paged_attention_prefill_ref,
    write_kv,
)


def test_conv_ref_packed_with_and_without_initial_state_and_short_sequences():
    g = torch.Generator().manual_seed(0)
    Dc, K, lens = 5, 4, [1, 6, 2]
    x = torch.randn(sum(lens), Dc, generator=g)
    w, b = torch.randn(Dc, K, generator=g), torch.randn(Dc, generator=g)
    states = torch.randn(4, Dc, K - 1, generator=g)
    before = states.clone()
    slots, has_init = torch.tensor([3, 0, 1]), torch.tensor([True, False, True])
    cu = torch.tensor([0] + lens).cumsum(0)
    out = causal_conv1d_ref(x, w, b, conv_states=states, cu_seqlens=cu, state_indices=slots, has_initial_state=has_init)
    for s in range(3):
        prev = before[slots[s]] if has_init[s] else torch.zeros(Dc, K - 1)
        want, want_state = conv_naive(x[cu[s] : cu[s + 1]], w, b, prev, "silu")
        assert_close(f"seq {s}", out[cu[s] : cu[s + 1]], want, torch.float32)
        assert_close(f"state {s}", states[slots[s]], want_state, torch.float32)
    torch.testing.assert_close(states[2], before[2])  # untouched slot


def test_conv_update_ref_equals_prefill_of_one_token():
    g = torch.Generator().manual_seed(1)
    Dc, K = 6, 4
    x, w = torch.randn(3, Dc, generator=g), torch.randn(Dc, K, generator=g)
    states = torch.randn(3, Dc, K - 1, generator=g)
    states2 = states.clone()
    slots = torch.tensor([2, 0, 1])
    out = causal_conv1d_update_ref(x, states, w, None, state_indices=slots, activation=None)
    want = causal_conv1d_ref(
        x, w, None, conv_states=states2, cu_seqlens=torch.arange(4), state_indices=slots,
        has_initial_state=torch.ones(3, dtype=torch.bool), activation=None,
    )
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(states, states2)


def paged_setup(lens, Hkv=2, Dh=8, block_size=4, seed=0):
    """Random contiguous K/V per sequence scattered into a shuffled paged cache via write_kv."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max((n + block_size - 1) // block_size for n in lens)
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = torch.zeros(num_blocks, block_size, Hkv, Dh)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for s, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        tables[s, :nb] = perm[used : used + nb].int()
        used += nb
        k, v = torch.randn(n, Hkv, Dh, generator=g), torch.randn(n, Hkv, Dh, generator=g)
        pos = torch.arange(n)
        write_kv(k, v, k_cache, v_cache, tables[s, pos // block_size].long() * block_size + pos % block_size)
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, tables, ks, vs


def test_paged_decode_ref_gqa_matches_contiguous_attention():
    lens = [1, 9, 4]
    k_cache, v_cache, tables, ks, vs = paged_setup(lens)
    q = torch.randn(3, 6, 8)
    out = paged_attention_decode_ref(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.3)
    for s, n in enumerate(lens):
        want = attention_naive(q[s : s + 1], ks[s], vs[s], 0.3, [n - 1])
        assert_close(f"seq {s}", out[s : s + 1], want, torch.float32)


def test_paged_decode_ref_reuses_scratch_across_sizes_and_keeps_threads_apart():
    """The decode ref gathers into per-thread scratch: a long call, then a short one, then a long one
    again must each equal plain attention, and two threads must never share a buffer."""
    import threading

    from hybridserve.kernels._scratch import scratch

    for lens, seed in (([40, 33], 3), ([2, 5], 4), ([40, 33], 5)):
        k_cache, v_cache, tables, ks, vs = paged_setup(lens, seed=seed)
        q = torch.randn(2, 6, 8)
        out = paged_attention_decode_ref(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.3)
        for s, n in enumerate(lens):
            assert_close(f"lens {lens} seq {s}", out[s : s + 1],
                         attention_naive(q[s : s + 1], ks[s], vs[s], 0.3, [n - 1]), torch.float32)
    here = scratch("t", (4, 4), torch.float32, torch.device("cpu"))
    assert scratch("t", (2, 3), torch.float32, torch.device("cpu")).data_ptr() == here.data_ptr()
    other = []
    worker = threading.Thread(target=lambda: other.append(scratch("t", (4, 4), torch.float32, torch.device("cpu"))))
    worker.start()
    worker.join()
    assert other[0].data_ptr() != here.data_ptr()


def test_scratch_made_in_inference_mode_is_writable_outside_it():
    """The engine runs under inference mode; kernels called later outside it reuse the same buffers."""
    from hybridserve.kernels._scratch import clear, scratch

    clear()
    with torch.inference_mode():
        scratch("inf", (8,), torch.float32, torch.device("cpu")).fill_(1.0)
    buf = scratch("inf", (8,), torch.float32, torch.device("cpu"))
    buf.add_(1.0)  # raises on an inference tensor
    assert torch.equal(buf, torch.full((8,), 2.0))


def test_paged_prefill_ref_queries_are_the_last_positions():
    lens, q_lens = [5, 9], [5, 3]
    k_cache, v_cache, tables, ks, vs = paged_setup(lens, seed=2)
    q = torch.randn(sum(q_lens), 4, 8)
    cu = torch.tensor([0] + q_lens).cumsum(0)
    out = paged_attention_prefill_ref(q, k_cache, v_cache, tables, cu, torch.tensor(lens, dtype=torch.int32), 0.5)
    for s, (n, m) in enumerate(zip(lens, q_lens)):
        want = attention_naive(q[cu[s] : cu[s + 1]], ks[s], vs[s], 0.5, list(range(n - m, n)))
        assert_close(f"seq {s}", out[cu[s] : cu[s + 1]], want, torch.float32)


@pytest.mark.parametrize("Hq, Hkv, Dh", [(4, 2, 8), (6, 3, 12), (3, 3, 16), (8, 1, 8)])
def test_paged_prefill_ref_later_chunks_and_gqa_groups(Hq, Hkv, Dh):
    """Chunks after the first (queries a suffix of a longer context) take the split path on
    CPU: unmasked prefix + causal chunk merged by log-sum-exp; one-token and whole-context
    queries too."""
    lens, q_lens = [37, 9, 20, 1, 16], [11, 1, 20, 1, 5]
    k_cache, v_cache, tables, ks, vs = paged_setup(lens, Hkv=Hkv, Dh=Dh, seed=5)
    q = torch.randn(sum(q_lens), Hq, Dh, generator=torch.Generator().manual_seed(6))
    cu = torch.tensor([0] + q_lens).cumsum(0)
    out = paged_attention_prefill_ref(q, k_cache, v_cache, tables, cu, torch.tensor(lens, dtype=torch.int32),
                                      Dh ** -0.5)
    for s, (n, m) in enumerate(zip(lens, q_lens)):
        want = attention_naive(q[cu[s] : cu[s + 1]], ks[s], vs[s], Dh ** -0.5, list(range(n - m, n)))
        assert_close(f"seq {s}", out[cu[s] : cu[s + 1]], want, torch.float32)


@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rms_norm_ref(group_size):
    g = torch.Generator().manual_seed(0)
    x, z, w = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g), torch.randn(12, generator=g)
    out = gated_rms_norm_ref(x, z, w, 1e-6, group_size)
    h = (x.double() * torch.nn.functional.silu(z.double())).view(3, -1, group_size or 12)
    want = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).view(3, 12) * w.double()
    assert_close("gated norm", out, want, torch.float32)
    if group_size is None:
        mod = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
        norm = mod.GraniteMoeHybridRMSNormGated(12)
        norm.weight.data.copy_(w)
        assert_close("vs HF", out, norm(x, z), torch.float32)
