"""Triton SSD chunked scan against the torch reference: packed odd lengths, states, chaining."""

import pytest
import torch
from kernels_testing import DEVICES, assert_close

from hybridserve.kernels.ssd import ssd_scan_ref
from hybridserve.kernels.ssd_fused_triton import ssd_scan_fused_triton
from hybridserve.kernels.ssd_triton import ssd_scan_triton

SEQ = ("x", "dt", "B", "C", "z")


def inputs(lens, H, P, G, N, dtype, device, seed=0, init=True):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d = dict(
        x=r(T, H, P), dt=r(T, H) - 1, A=-torch.rand(H, generator=g) * 2 - 0.1, B=r(T, G, N), C=r(T, G, N),
        D=r(H), z=r(T, H, P), dt_bias=r(H) * 0.5,
    )
    d = {k: v.to(device=device, dtype=dtype if k in SEQ else torch.float32) for k, v in d.items()}
    d["initial_states"] = r(len(lens), H, P, N).to(device) if init else None
    d["cu_seqlens"] = torch.tensor([0] + lens).cumsum(0).to(device)
    return d


KERNELS = {"4-kernel": ssd_scan_triton, "fused": ssd_scan_fused_triton}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lens,H,P,G,N,chunk",
    [([1, 37, 16], 6, 5, 2, 7, 16), ([21], 4, 16, 1, 16, 32), ([3, 0, 1, 2], 3, 8, 3, 4, 16)]  # with an empty sequence,
)
def test_ssd_matches_ref(device, kernel, dtype, lens, H, P, G, N, chunk):
    d = inputs(lens, H, P, G, N, dtype, device)
    y_want, f_want = ssd_scan_ref(**d, chunk_size=chunk)
    y, f = KERNELS[kernel](**d, chunk_size=chunk, blocks=dict(l=8, m=8, k=8, p=8))
    assert y.dtype == dtype and f.dtype == torch.float32
    assert_close("y", y, y_want, dtype)
    assert_close("final states", f, f_want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ssd_without_optional_inputs_and_with_dt_limit(device, kernel):
    d = inputs([19], 2, 4, 1, 8, torch.float32, device, init=False)
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"])
    kw = dict(chunk_size=16, dt_softplus=False, dt_limit=(0.05, 0.5))
    y_want, f_want = ssd_scan_ref(*args, **kw)
    y, f = KERNELS[kernel](*args, **kw)
    assert_close("y", y, y_want, torch.float32)
    assert_close("final", f, f_want, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ssd_two_chained_calls_equal_one_call(device, kernel):
    ssd_scan_triton = KERNELS[kernel]
    d = inputs([37], 4, 8, 2, 8, torch.float32, device, seed=4)
    y, f = ssd_scan_triton(**d, chunk_size=16)
    cut = 21
    first = {k: (v[:cut] if k in SEQ else v) for k, v in d.items()}
    second = {k: (v[cut:] if k in SEQ else v) for k, v in d.items()}
    first["cu_seqlens"] = torch.tensor([0, cut], device=device)
    second["cu_seqlens"] = torch.tensor([0, 37 - cut], device=device)
    y1, f1 = ssd_scan_triton(**first, chunk_size=16)
    y2, f2 = ssd_scan_triton(**{**second, "initial_states": f1}, chunk_size=16)
    assert_close("y chained", torch.cat([y1, y2]), y, torch.float32)
    assert_close("final chained", f2, f, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_ssd_reads_strided_views_of_one_projection(device, kernel):
    """x, z, B, C and dt as column slices of one [T, width] projection, as a Mamba-2 layer splits it."""
    d = inputs([13, 6], 4, 4, 2, 8, torch.float32, device, seed=7)
    T = 19
    parts = [d["z"].reshape(T, -1), d["x"].reshape(T, -1), d["B"].reshape(T, -1), d["C"].reshape(T, -1), d["dt"]]
    packed = torch.cat(parts, dim=1)
    z, x, B, C, dt = torch.split(packed, [p.shape[1] for p in parts], dim=1)
    views = dict(z=z.view(T, 4, 4), x=x.view(T, 4, 4), B=B.view(T, 2, 8), C=C.view(T, 2, 8), dt=dt)
    y_want, f_want = ssd_scan_ref(**d, chunk_size=16)
    y, f = KERNELS[kernel](**{**d, **views}, chunk_size=16)
    assert_close("y from views", y, y_want, torch.float32)
    assert_close("final from views", f, f_want, torch.float32)


def _prefix_state(d, seq, upto, chunk):
    """The reference state of sequence `seq` after its first `upto` tokens, scanned on its own."""
    cu = d["cu_seqlens"].tolist()
    sl = slice(cu[seq], cu[seq] + upto)
    part = {k: d[k][sl] for k in SEQ}
    _, final = ssd_scan_ref(**part, A=d["A"], D=d["D"], dt_bias=d["dt_bias"], chunk_size=chunk,
                            initial_states=d["initial_states"][seq:seq + 1])
    return final[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_states_at_offsets_are_prefix_states(device, dtype):
    """The prefix cache's snapshots: the state after o packed tokens equals scanning that prefix alone,
    for offsets on and off chunk boundaries, in several sequences; y and final states do not change."""
    lens, chunk = [37, 5, 40], 16
    d = inputs(lens, 4, 8, 2, 8, dtype, device, seed=3)
    offsets = [8, 16, 33, 37 + 2, 42 + 16, 42 + 39]  # mid-chunk, on a chunk edge, last token but one
    where = [(0, 8), (0, 16), (0, 33), (1, 2), (2, 16), (2, 39)]
    y_plain, f_plain = ssd_scan_ref(**d, chunk_size=chunk)
    y_ref, f_ref, kept_ref = ssd_scan_ref(**d, chunk_size=chunk, state_offsets=offsets)
    assert_close("y (cut chunks)", y_ref, y_plain, dtype)
    assert_close("final (cut chunks)", f_ref, f_plain, dtype)
    for k, (seq, upto) in enumerate(where):
        assert_close(f"state {k}", kept_ref[k], _prefix_state(d, seq, upto, chunk), dtype)
    y, f, kept = ssd_scan_triton(**d, chunk_size=chunk, state_offsets=offsets, blocks=dict(l=8, m=8, k=8, p=8))
    assert kept.shape == (len(offsets), 4, 8, 8) and kept.dtype == torch.float32
    assert_close("triton y", y, y_ref, dtype)
    assert_close("triton final", f, f_ref, dtype)
    assert_close("triton kept", kept, kept_ref, dtype)


@pytest.mark.parametrize("bad", [[0], [37], [82]])  # a sequence's start or end is not inside it
def test_ssd_state_offsets_must_be_inside_a_sequence(bad):
    d = inputs([37, 5, 40], 2, 4, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="strictly inside"):
        ssd_scan_ref(**d, chunk_size=16, state_offsets=bad)
