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


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.use_triton(torch.zeros(1))


def test_public_ops_run_on_cpu(monkeypatch):
    monkeypatch.delenv("HYBRIDSERVE_KERNELS", raising=False)
    out = dispatch.gated_rms_norm(torch.ones(2, 4), torch.zeros(2, 4), torch.ones(4))
    assert out.shape == (2, 4)
    y, final = dispatch.ssd_scan(
        torch.ones(3, 2, 2), torch.zeros(3, 2), -torch.ones(2), torch.ones(3, 1, 4), torch.ones(3, 1, 4)
    )
    assert y.shape == (3, 2, 2) and final.shape == (1, 2, 2, 4)
