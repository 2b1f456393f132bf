"""The C++ SSD piece scan against `ssd._scan_cpu` (what it replaces) and `_chunk_ref` (the oracle)."""
import pytest
import torch

from hybridserve.kernels import cpu_ssd, ssd
from tests.kernels.kernels_testing import torch_threads

needs_ext = pytest.mark.skipif(not cpu_ssd.available(), reason="the C++ SSD kernel cannot be built here")


def _piece(L, G, R, P, N, seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(L, G * R * P + 2 * G * N + 7, generator=g)       # x, B, C as views of one row, as in the mixer
    x = row[:, :G * R * P].view(L, G, R, P)
    B = row[:, G * R * P:G * R * P + G * N].view(L, G, N)
    C = row[:, G * R * P + G * N:G * R * P + 2 * G * N].view(L, G, N)
    dt = torch.nn.functional.softplus(torch.randn(L, G, R, generator=g) - 1)
    A = -torch.rand(G, R, generator=g) * 2 - 0.05
    state = torch.randn(G, R, P, N, generator=g)
    return x, dt, A, B, C, state


@needs_ext
@pytest.mark.parametrize("L,G,R,P,N", [(1, 1, 2, 16, 16), (63, 2, 3, 32, 16), (64, 1, 4, 64, 64),
                                       (65, 1, 2, 64, 40), (200, 2, 2, 24, 8), (130, 1, 1, 128, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_piece_matches_the_torch_scan_and_the_oracle(L, G, R, P, N, threads):
    x, dt, A, B, C, state = _piece(L, G, R, P, N, seed=L * P + N)
    with torch_threads(threads):
        y, final = cpu_ssd.scan_piece(x, dt, A, B, C, state)
    y_t, final_t = ssd._scan_cpu(x, dt, A, B, C, state)
    y_o, final_o = ssd._chunk_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), state.double())
    print("max |y - torch|", (y - y_t).abs().max().item(), "|y - fp64|", (y.double() - y_o).abs().max().item())
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_t, rtol=1e-4, atol=1e-4)
    scale = y_o.abs().max().item()
    assert (y.double() - y_o).abs().max().item() < 2e-5 * max(scale, 1.0)
    assert (final.double() - final_o).abs().max().item() < 2e-5 * max(final_o.abs().max().item(), 1.0)


@needs_ext
def test_the_scan_uses_it_and_keeps_snapshot_states():
    """ssd_scan on CPU runs the C++ pieces, cut at the snapshot offsets, with the same states as the
    torch pieces."""
    T, H, P, G, N = 150, 4, 32, 2, 16
    g = torch.Generator().manual_seed(7)
    x, dt = torch.randn(T, H, P, generator=g), torch.randn(T, H, generator=g)
    B, C = torch.randn(T, G, N, generator=g), torch.randn(T, G, N, generator=g)
    A, D = -torch.rand(H, generator=g) - 0.1, torch.randn(H, generator=g)
    cu = torch.tensor([0, 90, 150])
    init = torch.randn(2, H, P, N, generator=g)
    kw = dict(dt_bias=torch.zeros(H), initial_states=init, cu_seqlens=cu, state_offsets=[40, 120])
    got = ssd.ssd_scan(x, dt, A, B, C, D, **kw)
    want = ssd.ssd_scan_ref(x, dt, A, B, C, D, chunk_size=150, chunk_fn=ssd._scan_cpu, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_other_dtypes_are_not_taken():
    assert not cpu_ssd.usable(torch.zeros(2, 1, 1, 4, dtype=torch.float64))
