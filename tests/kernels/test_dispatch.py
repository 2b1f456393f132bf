"""The dispatch module: imports without Triton use, honours HYBRIDSERVE_KERNELS."""

import pytest
import torch

from hybridserve.kernels import _backend, dispatch


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("HYBRIDSERVE_KERNELS", raising=False)
    assert not dispatch.use_triton(torch.zeros(1))


def test_env_var_forces_ref_and_rejects_unknown(monkeypatch):
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "ref")
    assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="HYBRIDSERVE_KERNELS"):
        dispatch.use_triton(torch.zeros(1))


@pytest.mark.parametrize("has_triton", [True, False], ids=["triton-imports", "no-triton"])
def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch, has_triton):
    # both cases run whether or not triton is installed here: the import's outcome is patched in
    monkeypatch.setattr(_backend, "HAS_TRITON", has_triton)
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.zeros(1)
    if has_triton:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.use_triton(cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.use_triton(cpu) is True  # the interpreter runs the kernels on CPU tensors
    else:
        for interpret in ("0", "1"):  # no interpreter helps when triton does not import
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
            with pytest.raises(RuntimeError, match="triton does not import"):
                dispatch.use_triton(cpu)
    monkeypatch.delenv("HYBRIDSERVE_KERNELS")
    assert dispatch.use_triton(cpu) is False  # unforced, CPU tensors take the reference either way


def test_public_ops_run_on_cpu(monkeypatch):
    monkeypatch.delenv("HYBRIDSERVE_KERNELS", raising=False)
    out = dispatch.gated_rms_norm(torch.ones(2, 4), torch.zeros(2, 4), torch.ones(4))
    assert out.shape == (2, 4)
    y, final = dispatch.ssd_scan(
        torch.ones(3, 2, 2), torch.zeros(3, 2), -torch.ones(2), torch.ones(3, 1, 4), torch.ones(3, 1, 4)
    )
    assert y.shape == (3, 2, 2) and final.shape == (1, 2, 2, 4)


@pytest.mark.skipif(not _backend.HAS_TRITON or torch.cuda.is_available(), reason="needs triton's CPU interpreter")
@pytest.mark.parametrize("fused", ["0", "1"])
def test_forcing_triton_runs_the_kernels_through_the_public_ops(monkeypatch, fused):
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("HYBRIDSERVE_SSD_FUSED", fused)
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(9, 2, 4, generator=g), torch.randn(9, 2, generator=g)
    A, B, C = -torch.rand(2, generator=g), torch.randn(9, 1, 8, generator=g), torch.randn(9, 1, 8, generator=g)
    y, final = dispatch.ssd_scan(x, dt, A, B, C, chunk_size=4)
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "ref")
    y_ref, final_ref = dispatch.ssd_scan(x, dt, A, B, C, chunk_size=4)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=1e-4, rtol=1e-4)
