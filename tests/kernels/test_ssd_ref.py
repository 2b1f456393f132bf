"""The SSD and state-update torch references against step-by-step loops and Hugging Face."""

import pytest
import torch
from kernels_testing import assert_close, report, ssd_naive

from hybridserve.kernels.ssd import ssd_scan_ref
from hybridserve.kernels.state_update import selective_state_update_ref


def ssd_inputs(lens, H=6, P=5, G=2, N=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        x=r(T, H, P).to(dtype), dt=(r(T, H) - 1).to(dtype), A=-torch.rand(H, generator=g) * 2 - 0.1,
        B=r(T, G, N).to(dtype), C=r(T, G, N).to(dtype), D=r(H), z=r(T, H, P).to(dtype), dt_bias=r(H) * 0.5,
        initial_states=r(len(lens), H, P, N),
        cu_seqlens=torch.tensor([0] + lens).cumsum(0),
    )


def test_ssd_ref_matches_token_loop_on_packed_odd_lengths():
    inp = ssd_inputs([1, 13, 7])
    y, final = ssd_scan_ref(**inp, chunk_size=4)
    y_want, final_want = ssd_naive(**inp)
    assert_close("y", y, y_want, torch.float32)
    assert_close("final", final, final_want, torch.float32)


def test_ssd_ref_does_not_depend_on_chunk_size():
    inp = ssd_inputs([19, 5])
    y1, f1 = ssd_scan_ref(**inp, chunk_size=3)
    y2, f2 = ssd_scan_ref(**inp, chunk_size=256)
    report("y chunk 3 vs 256", y1, y2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)


def test_ssd_ref_matches_hugging_face_chunk_scan():
    mod = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    inp = ssd_inputs([37], H=8, P=4, G=2, N=6)
    inp.pop("z")
    inp.pop("cu_seqlens")
    y, final = ssd_scan_ref(**inp, chunk_size=16)
    y_hf, final_hf = mod.mamba2_chunk_scan(
        inp["x"][None], inp["dt"][None], inp["A"], inp["B"][None], inp["C"][None], 16, D=inp["D"],
        dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], dt_softplus=True, return_final_states=True,
    )
    report("y vs HF", y, y_hf[0])
    rel = (y - y_hf[0]).abs().max() / y_hf.abs().max()
    rel_state = (final - final_hf).abs().max() / final_hf.abs().max()
    assert rel < 1e-5 and rel_state < 1e-5


def test_ssd_ref_two_calls_chained_equal_one_call():
    inp = ssd_inputs([23], seed=3)
    y, final = ssd_scan_ref(**inp, chunk_size=8)
    cut = 10
    first = {k: (v[:cut] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    second = {k: (v[cut:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    first["cu_seqlens"] = torch.tensor([0, cut])
    second["cu_seqlens"] = torch.tensor([0, 23 - cut])
    y1, f1 = ssd_scan_ref(**first, chunk_size=8)
    second["initial_states"] = f1
    y2, f2 = ssd_scan_ref(**second, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2]), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f2, final, atol=1e-5, rtol=1e-5)


def test_state_update_ref_equals_one_scan_step_and_hugging_face():
    mod = pytest.importorskip("transformers.models.granitemoehybrid.modeling_granitemoehybrid")
    inp = ssd_inputs([1, 1, 1], seed=5)
    y_scan, final_scan = ssd_scan_ref(**inp)
    state = torch.zeros(5, 6, 5, 7)
    slots = torch.tensor([4, 0, 2])
    state[slots] = inp["initial_states"]
    y = selective_state_update_ref(
        state, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], z=inp["z"],
        dt_bias=inp["dt_bias"], state_indices=slots,
    )
    assert_close("y vs scan", y, y_scan, torch.float32)
    assert_close("state vs scan", state[slots], final_scan, torch.float32)
    hf_state = inp["initial_states"].clone()
    P, N = hf_state.shape[2:]
    # Hugging Face takes dt, dt_bias, A and D expanded over the head dim (and A over the state)
    y_hf = mod.mamba2_selective_state_update(
        hf_state, inp["x"], inp["dt"][..., None].expand(-1, -1, P), inp["A"][:, None, None].expand(-1, P, N),
        inp["B"], inp["C"], D=inp["D"][:, None].expand(-1, P), dt_bias=inp["dt_bias"][:, None].expand(-1, P),
        dt_softplus=True, z=inp["z"],
    )
    assert_close("y vs HF", y, y_hf, torch.float32)
    assert_close("state vs HF", state[slots], hf_state, torch.float32)


def test_the_cpu_scan_matches_the_token_loop_and_the_reference(monkeypatch):
    """What `ssd_scan` runs on CPU (`_scan_cpu`: every chunk of a piece at once, differenced
    decays, dt = 0 padding) against the step-by-step loop, with pieces shorter than, equal to
    and not a multiple of the chunk, and with steep decays too (A down to about -8: a chunk's
    running sum of dt * A reaches the hundreds, where differencing it costs the most precision)."""
    from hybridserve.kernels.ssd import _scan_cpu

    for lens, chunk, steep in (([1, 13, 7], 4, False), ([300, 41], 256, False), ([260], 64, True),
                               ([64, 128, 5], 64, False)):
        monkeypatch.setenv("HYBRIDSERVE_CPU_SSD_CHUNK", str(chunk))
        inp = ssd_inputs(lens, seed=len(lens))
        if steep:
            inp["A"] = inp["A"] * 4
        y, final = ssd_scan_ref(**inp, chunk_size=sum(lens), chunk_fn=_scan_cpu)
        y_want, final_want = ssd_naive(**inp)
        assert_close("y", y, y_want, torch.float32)
        assert_close("final", final, final_want, torch.float32)
        y_ref, _ = ssd_scan_ref(**inp, chunk_size=chunk)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_the_cpu_scan_takes_whole_pieces_and_matches_the_models(monkeypatch):
    """ssd_scan on CPU hands `_scan_cpu` one piece per sequence, cut only at the snapshot
    offsets, whatever the model's chunk and the CPU chunk, with the same result as the
    reference at the model's chunk; the kept states are the ones asked for."""
    from hybridserve.kernels import cpu_ssd, ssd

    inp = ssd_inputs([300, 77], H=4, P=8, G=2, N=16, seed=3)
    want_y, want_f, want_k = ssd_scan_ref(**inp, chunk_size=256, state_offsets=[128, 340])
    real_torch, real_cpp = ssd._scan_cpu, cpu_ssd.scan_piece
    for cpu_chunk in ("16", "64", "256"):
        monkeypatch.setenv("HYBRIDSERVE_CPU_SSD_CHUNK", cpu_chunk)
        seen = []
        monkeypatch.setattr(ssd, "_scan_cpu", lambda x, *a: (seen.append(("torch", x.shape[0])), real_torch(x, *a))[1])
        monkeypatch.setattr(cpu_ssd, "scan_piece", lambda x, *a: (seen.append(("cpp", x.shape[0])), real_cpp(x, *a))[1])
        y, f, k = ssd.ssd_scan(**inp, chunk_size=256, state_offsets=[128, 340])
        # the C++ pieces run at their own chunk (64) when they are built; any other CPU chunk keeps torch's
        kind = "cpp" if cpu_chunk == "64" and cpu_ssd.available() else "torch"
        assert seen == [(kind, n) for n in (128, 172, 40, 37)], seen
        torch.testing.assert_close(y, want_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f, want_f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k, want_k, atol=1e-4, rtol=1e-4)
    monkeypatch.delenv("HYBRIDSERVE_CPU_SSD_CHUNK")
    assert ssd.cpu_chunk_size() == ssd.CPU_CHUNK == 64
