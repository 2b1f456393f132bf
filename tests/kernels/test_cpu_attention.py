"""The C++ CPU paged decode kernel against the torch reference, its dispatch, and its fallbacks."""

import os
import subprocess
import sys

import pytest
import torch
from test_paged_attention import paged

from hybridserve.kernels import cpu_attention
from hybridserve.kernels._cpp import CppKernel
from hybridserve.kernels import paged_attention as PA
from tests.kernels.kernels_testing import torch_threads

needs_kernel = pytest.mark.skipif(not cpu_attention.available(),
                                  reason=f"C++ kernel not built here: {cpu_attention.why_unavailable()}")


def exact_fp64(q, k_cache, v_cache, tables, ctx, scale):
    """Decode attention token by token from the block table, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // Hkv
    for b, n in enumerate(ctx.tolist()):
        rows = [tables[b, t // page].item() for t in range(n)]
        k = torch.stack([k_cache[r, t % page] for t, r in enumerate(rows)]).double()  # [n, Hkv, D]
        v = torch.stack([v_cache[r, t % page] for t, r in enumerate(rows)]).double()
        for h in range(q.shape[1]):
            w = torch.softmax(k[:, h // group] @ q[b, h].double() * scale, dim=0)
            out[b, h] = w @ v[:, h // group]
    return out


@needs_kernel
@pytest.mark.parametrize("lens, Hq, Hkv, Dh, page", [
    ([1, 7, 13, 16], 6, 2, 24, 4),        # a one-token context, partial and whole last blocks
    ([100, 33], 8, 2, 64, 16),            # the small models' heads
    ([50], 8, 8, 32, 16),                 # no grouping, one sequence (split over heads)
    ([5, 300, 17], 12, 4, 80, 1),         # one token per block
    ([70, 2], 3, 1, 128, 32),
    ([40, 9], 4, 2, 20, 8),               # a head size that is not a multiple of 8: the generic loops
    ([600, 130], 9, 3, 64, 16),           # SmolLM2's heads: 160-token segments, the last one partial
    ([1100, 513, 512], 8, 2, 64, 8),      # 16 lanes, 256-token segments: a partial last one, one token past one, ending on one
    ([1100], 9, 3, 64, 16),               # one sequence: at 2 threads, items of 2 and 1 kv heads
    ([40, 3], 9, 1, 16, 16),              # 9 query heads per kv head: past the 16-lane path, 8 lanes
])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_reference(lens, Hq, Hkv, Dh, page, threads):
    q, k, v, tables, ctx = paged(lens, Hq, Hkv, Dh, page, torch.float32, "cpu", seed=sum(lens))
    with torch_threads(threads):
        for scale in (Dh ** -0.5, 3.0):   # 3.0 spreads scores far: most weights underflow to 0
            got = cpu_attention.paged_attention_decode_cpu(q, k, v, tables, ctx, scale)
            ref = PA.paged_attention_decode_ref(q, k, v, tables, ctx, scale)
            exact = exact_fp64(q, k, v, tables, ctx, scale)
            # as close to the fp64 answer as the fp32 reference is (logits near 100 leave both
            # ~1e-5 off at scale 3), and never far from it
            ours, theirs = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
            assert ours <= max(2 * theirs, 2e-6), (ours, theirs)


@needs_kernel
def test_the_16_lane_and_8_lane_decode_paths_agree_where_both_apply():
    mod = cpu_attention._load()
    assert mod.decode16_supported(64, 4) and mod.decode16_supported(256, 8)
    assert not mod.decode16_supported(24, 1) and not mod.decode16_supported(64, 9)
    assert not mod.decode16_supported(272, 1)
    q, k, v, tables, ctx = paged([333, 1, 47], 8, 2, 64, 16, torch.float32, "cpu", seed=5)
    args = (q, k, v, tables.int(), ctx.int(), 0.125)
    torch.testing.assert_close(mod.paged_decode16(*args), mod.paged_decode(*args), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not a multiple of 16|query heads per kv head"):
        mod.paged_decode16(q[..., :24].contiguous(), k[..., :24].contiguous(), v[..., :24].contiguous(),
                           *args[3:])


@needs_kernel
def test_decode_on_cpu_goes_to_the_kernel(monkeypatch):
    q, k, v, tables, ctx = paged([9, 20], 4, 2, 16, 4, torch.float32, "cpu")
    calls = []
    real = cpu_attention.paged_attention_decode_cpu
    monkeypatch.setattr(cpu_attention, "paged_attention_decode_cpu",
                        lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(PA, "use_triton", lambda t: False)      # as on a CPU worker
    out = PA.paged_attention_decode(q, k, v, tables, ctx, 0.25)
    assert calls == [1]
    torch.testing.assert_close(out, PA.paged_attention_decode_ref(q, k, v, tables, ctx, 0.25),
                               atol=2e-6, rtol=2e-5)
    q16 = q.to(torch.bfloat16)
    assert not cpu_attention.usable(q16, k.to(torch.bfloat16))   # other dtypes keep the reference


def test_a_failed_build_falls_back_to_the_reference(monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension: c++: not found")
    monkeypatch.setattr(ext, "load_inline", no_compiler)
    fresh = CppKernel(cpu_attention._KERNEL.name, cpu_attention._KERNEL.source, cpu_attention._KERNEL.functions,
                      cpu_attention._KERNEL.what)
    monkeypatch.setattr(cpu_attention, "_KERNEL", fresh)
    with caplog.at_level("WARNING"):
        assert not cpu_attention.available()
    assert "c++: not found" in cpu_attention.why_unavailable()
    assert "CPU attention kernel unavailable, using the torch path" in caplog.text
    q, k, v, tables, ctx = paged([9], 4, 2, 16, 4, torch.float32, "cpu")
    assert not cpu_attention.usable(q, k)
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_attention.paged_attention_decode_cpu(q, k, v, tables, ctx, 0.25)


def test_switched_off_by_the_environment():
    code = "from hybridserve.kernels import cpu_attention as c; print(c.available(), c.why_unavailable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYBRIDSERVE_CPU_KERNELS": "0"})
    assert out.stdout.strip() == "False HYBRIDSERVE_CPU_KERNELS=0", out.stderr


def prefill_fp64(q, k, v, scale):
    """Causal attention of the last T positions of ctx, float64: q [Hq, T, D], k/v [Hkv, ctx, D]."""
    Hq, T, _ = q.shape
    Hkv, ctx = k.shape[0], k.shape[1]
    kk = k.double().repeat_interleave(Hq // Hkv, 0)
    vv = v.double().repeat_interleave(Hq // Hkv, 0)
    scores = q.double() @ kk.transpose(1, 2) * scale                       # [Hq, T, ctx]
    visible = torch.ones(T, ctx, dtype=torch.bool).tril(ctx - T)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vv


@needs_kernel
@pytest.mark.parametrize("Hq, Hkv, T, ctx, D", [
    (8, 2, 1, 1, 64),          # one token, one key
    (8, 2, 5, 70, 64),         # a short chunk late in a context that is not whole key blocks
    (9, 3, 130, 130, 64),      # SmolLM2's heads, a whole causal prompt
    (8, 2, 300, 700, 64),      # the small pair's heads, a later chunk
    (4, 4, 33, 200, 128),      # no grouping, a larger head
    (2, 1, 17, 17, 32),
    (6, 2, 64, 64, 256),       # the largest head it takes
    (3, 1, 7, 129, 16),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_matches_float64_attention(Hq, Hkv, T, ctx, D, threads):
    g = torch.Generator().manual_seed(Hq * T + ctx + D)
    q, k, v = (torch.randn(Hq, T, D, generator=g), torch.randn(Hkv, ctx, D, generator=g),
               torch.randn(Hkv, ctx, D, generator=g))
    with torch_threads(threads):
        for scale in (D ** -0.5, 3.0):     # 3.0: scores far apart, most weights underflow to 0
            got = cpu_attention.prefill_attention_cpu(q, k, v, scale)
            exact = prefill_fp64(q, k, v, scale)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], scale=scale, enable_gqa=True,
                attn_mask=torch.ones(T, ctx, dtype=torch.bool).tril(ctx - T))[0]
            ours, theirs = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
            assert got.shape == q.shape and ours <= max(2 * theirs, 2e-6), (ours, theirs)


@needs_kernel
def test_prefill_refuses_what_it_does_not_take():
    q, k = torch.randn(4, 8, 64), torch.randn(2, 16, 64)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        cpu_attention.prefill_attention_cpu(torch.randn(4, 20, 64), k, k, 0.1)     # more queries than context
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_attention.prefill_attention_cpu(torch.randn(4, 8, 24), torch.randn(2, 16, 24),
                                            torch.randn(2, 16, 24), 0.1)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_attention.prefill_attention_cpu(q.double(), k.double(), k.double(), 0.1)
    assert not cpu_attention.prefill_usable(torch.randn(4, 8, 24)) and not cpu_attention.prefill_usable(q.half())
    assert cpu_attention.prefill_usable(q)


@needs_kernel
@pytest.mark.parametrize("Dh", [16, 64, 12])
def test_paged_prefill_on_cpu_goes_to_the_kernel_where_it_applies(monkeypatch, Dh):
    """Chunks of several sequences, first and later ones: the kernel where the head size fits,
    the torch reference otherwise and when switched off; both agree."""
    lens, q_lens = [37, 9, 20, 1, 70], [11, 9, 20, 1, 5]
    _, k, v, tables, _ = paged(lens, 8, 2, Dh, 4, torch.float32, "cpu", seed=3)
    q = torch.randn(sum(q_lens), 8, Dh, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0] + q_lens).cumsum(0)
    ctx = torch.tensor(lens, dtype=torch.int32)
    calls = []
    real = cpu_attention.prefill_attention_cpu
    monkeypatch.setattr(cpu_attention, "prefill_attention_cpu", lambda *a: calls.append(1) or real(*a))
    out = PA.paged_attention_prefill(q, k, v, tables, cu, ctx, Dh ** -0.5)
    assert len(calls) == (len(lens) if Dh % 16 == 0 else 0)
    ref = PA.paged_attention_prefill_ref(q, k, v, tables, cu, ctx, Dh ** -0.5)
    torch.testing.assert_close(out, ref, atol=3e-6, rtol=3e-5)
    calls.clear()
    monkeypatch.setenv("HYBRIDSERVE_CPU_PREFILL_ATTENTION", "0")
    assert torch.equal(PA.paged_attention_prefill(q, k, v, tables, cu, ctx, Dh ** -0.5), ref) and calls == []
