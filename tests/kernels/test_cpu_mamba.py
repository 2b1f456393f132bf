"""The C++ Mamba-2 decode step against the composition of the three decode refs it replaces."""
import pytest
import torch

from hybridserve.kernels import cpu_mamba
from tests.kernels.kernels_testing import torch_threads

needs_ext = pytest.mark.skipif(not cpu_mamba.available(), reason="the C++ CPU Mamba kernel cannot be built here")


def _layer(H, P, N, G, K, bias, seed):
    g = torch.Generator().manual_seed(seed)
    d_inner, conv_dim = H * P, H * P + 2 * G * N
    return dict(
        conv_weight=torch.randn(conv_dim, K, generator=g) * 0.5,
        conv_bias=torch.randn(conv_dim, generator=g) * 0.1 if bias else None,
        dt_bias=torch.randn(H, generator=g) * 0.5,
        A=-torch.rand(H, generator=g) * 4 - 0.1,
        D=torch.randn(H, generator=g),
        norm_weight=torch.randn(d_inner, generator=g),
    ), g


@needs_ext
@pytest.mark.parametrize("H,P,N,G,K,bias", [(4, 8, 16, 1, 4, True), (6, 5, 24, 2, 4, False),
                                            (16, 64, 64, 1, 4, True), (3, 7, 40, 3, 2, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_matches_the_refs_and_updates_the_states_in_place(H, P, N, G, K, bias, threads):
    params, g = _layer(H, P, N, G, K, bias, seed=H * P + N)
    d_inner, conv_dim, slots_n, rows = H * P, H * P + 2 * G * N, 9, 5
    conv = torch.randn(slots_n, conv_dim, K - 1, generator=g)
    ssm = torch.randn(slots_n, H, P, N, generator=g)
    wide = torch.randn(rows, d_inner + conv_dim + H + 3, generator=g)
    zxbcdt = wide[:, 1:1 + d_inner + conv_dim + H]          # strided rows, as a slice of a bigger product
    slots = torch.tensor([7, 2, 3, 0, 5])                 # out of order, with a run
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    want = cpu_mamba.mamba_decode_ref(zxbcdt, conv_ref, ssm_ref, slots, n_groups=G, eps=1e-5, **params)
    with torch_threads(threads):
        got = cpu_mamba.mamba_decode(zxbcdt, conv, ssm, slots, n_groups=G, eps=1e-5, **params)
    print("max |out - ref|", (got - want).abs().max().item(), "state", (ssm - ssm_ref).abs().max().item())
    torch.testing.assert_close(got, want, rtol=3e-4, atol=1e-4)
    torch.testing.assert_close(ssm, ssm_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv, conv_ref, rtol=0, atol=0)     # the shift is a copy
    untouched = [s for s in range(slots_n) if s not in slots.tolist()]
    assert torch.equal(ssm[untouched], ssm_ref[untouched])


@needs_ext
def test_repeated_steps_stay_on_the_reference():
    """Ten steps in a row: the state the kernel leaves is the one its next step reads."""
    H, P, N, G, K = 4, 16, 32, 2, 4
    params, g = _layer(H, P, N, G, K, True, seed=11)
    conv_dim = H * P + 2 * G * N
    conv, ssm = torch.zeros(3, conv_dim, K - 1), torch.zeros(3, H, P, N)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    slots = torch.tensor([2, 0])
    for _ in range(10):
        zxbcdt = torch.randn(2, H * P + conv_dim + H, generator=g)
        want = cpu_mamba.mamba_decode_ref(zxbcdt, conv_ref, ssm_ref, slots, n_groups=G, eps=1e-6, **params)
        got = cpu_mamba.mamba_decode(zxbcdt, conv, ssm, slots, n_groups=G, eps=1e-6, **params)
        torch.testing.assert_close(got, want, rtol=3e-4, atol=1e-4)
    torch.testing.assert_close(ssm, ssm_ref, rtol=1e-4, atol=1e-5)
    assert ssm[1].abs().sum() == 0                         # a slot no row names stays as it was


@needs_ext
def test_bad_slots_and_shapes_are_refused_not_written():
    H, P, N, G, K = 2, 4, 16, 1, 4
    params, g = _layer(H, P, N, G, K, True, seed=3)
    conv_dim = H * P + 2 * G * N
    conv, ssm = torch.zeros(2, conv_dim, K - 1), torch.zeros(2, H, P, N)
    zxbcdt = torch.randn(1, H * P + conv_dim + H, generator=g)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_mamba.mamba_decode(zxbcdt, conv, ssm, torch.tensor([2]), n_groups=G, eps=1e-6, **params)
    with pytest.raises(RuntimeError, match="disagree"):
        cpu_mamba.mamba_decode(zxbcdt[:, :-1], conv, ssm, torch.tensor([0]), n_groups=G, eps=1e-6, **params)
    assert conv.abs().sum() == 0 and ssm.abs().sum() == 0


def test_other_dtypes_keep_the_reference():
    H, P, N, G, K = 2, 4, 16, 1, 4
    params, g = _layer(H, P, N, G, K, True, seed=5)
    params = {k: v.double() if v is not None else None for k, v in params.items()}
    conv_dim = H * P + 2 * G * N
    conv, ssm = torch.randn(2, conv_dim, K - 1, dtype=torch.float64), torch.randn(2, H, P, N, dtype=torch.float64)
    zxbcdt = torch.randn(2, H * P + conv_dim + H, dtype=torch.float64)
    assert not cpu_mamba.usable(zxbcdt, conv, ssm)
    conv_ref, ssm_ref = conv.clone(), ssm.clone()
    got = cpu_mamba.mamba_decode(zxbcdt, conv, ssm, torch.tensor([1, 0]), n_groups=G, eps=1e-6, **params)
    want = cpu_mamba.mamba_decode_ref(zxbcdt, conv_ref, ssm_ref, torch.tensor([1, 0]), n_groups=G, eps=1e-6,
                                      **params)
    assert got.dtype == torch.float64 and torch.equal(got, want) and torch.equal(ssm, ssm_ref)


@needs_ext
@pytest.mark.parametrize("Dc,K,bias,act", [(40, 4, True, "silu"), (37, 4, False, "silu"), (24, 2, True, None),
                                           (16, 1, True, "silu")])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_conv_matches_the_reference_over_packed_sequences(Dc, K, bias, act, threads):
    """Sequences longer and shorter than the conv's history, with and without a previous state,
    in slots out of order; the states left behind are the ref's, bit for bit."""
    g = torch.Generator().manual_seed(Dc * K)
    lens = [70, 1, 2, 130, 3]
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)
    slots = torch.tensor([4, 0, 2, 1, 5])
    has_init = torch.tensor([True, True, False, False, True])
    wide = torch.randn(T, Dc + 5, generator=g)
    x = wide[:, 2:2 + Dc]                                   # strided rows
    w = torch.randn(Dc, K, generator=g) * 0.5
    b = torch.randn(Dc, generator=g) if bias else None
    states = torch.randn(6, Dc, K - 1, generator=g)
    states_ref = states.clone()
    want = cpu_mamba_ref_conv(x, w, b, states_ref, cu, slots, has_init, act)
    with torch_threads(threads):
        got = cpu_mamba.causal_conv1d_cpu(x, w, b, conv_states=states, cu_seqlens=cu, state_indices=slots,
                                          has_initial_state=has_init, activation=act)
    print("max |out - ref|", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(states, states_ref)


def cpu_mamba_ref_conv(x, w, b, states, cu, slots, has_init, act):
    from hybridserve.kernels.conv1d import causal_conv1d_ref

    return causal_conv1d_ref(x, w, b, conv_states=states, cu_seqlens=cu, state_indices=slots,
                             has_initial_state=has_init, activation=act)


@needs_ext
@pytest.mark.parametrize("T,D,group", [(1, 1024, None), (37, 96, 32), (5, 50, None)])
def test_gated_norm_matches_the_reference(T, D, group):
    from hybridserve.kernels import gated_rmsnorm

    g = torch.Generator().manual_seed(T * D)
    y = torch.randn(T, D, generator=g) * 2
    zx = torch.randn(T, D + 9, generator=g) * 3           # the gate as a slice of the in_proj output
    z = zx[:, 4:4 + D]
    w = torch.randn(D, generator=g)
    assert cpu_mamba.gated_rms_norm_usable(y, z, w)
    got = gated_rmsnorm.gated_rms_norm(y, z, w, 1e-5, group)
    want = gated_rmsnorm.gated_rms_norm_ref(y, z, w, 1e-5, group)
    print("max |out - ref|", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
