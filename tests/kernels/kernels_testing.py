"""Shared helpers for the kernel tests: devices, tolerances, and step-by-step oracles."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: (3e-4, 1e-3), torch.bfloat16: (1e-2, 5e-2)}  # (atol, rtol) per dtype


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_ok()

# "cpu" runs the Triton kernels in the interpreter; "cuda" compiles them.
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            HAS_CUDA or not HAS_TRITON, reason="interpreter variant runs only on CPU-only machines with triton"
        ),
    ),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]


def report(name, got, want):
    """Print max/mean abs difference (fp32) before the caller asserts."""
    diff = (got.double() - want.double()).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


def assert_close(name, got, want, dtype):
    report(name, got, want)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def ssd_naive(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens):
    """Token-by-token recurrence in fp64; returns (y [T, H, P] fp64, final [S, H, P, N] fp64)."""
    T, H, P = x.shape
    G, N = B.shape[1:]
    grp = torch.arange(H) // (H // G)
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0)
    dt = F.softplus(dt)
    y = torch.zeros(T, H, P, dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    finals = []
    for s in range(len(bounds) - 1):
        h = initial_states[s].double().clone() if initial_states is not None else torch.zeros(H, P, N, dtype=torch.float64)
        for t in range(bounds[s], bounds[s + 1]):
            dA = torch.exp(dt[t] * A.double())  # [H]
            h = h * dA[:, None, None] + (dt[t][:, None] * x[t].double())[..., None] * B[t].double()[grp][:, None, :]
            y[t] = (h * C[t].double()[grp][:, None, :]).sum(-1)
        finals.append(h)
    if D is not None:
        y = y + D.double()[:, None] * x.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y, torch.stack(finals)


def conv_naive(x, weight, bias, prev, activation):
    """One sequence: x [L, Dc], prev [Dc, K-1] -> (out [L, Dc] fp64, new state [Dc, K-1] fp64)."""
    K = weight.shape[1]
    seq = torch.cat([prev.double(), x.double().t()], dim=1)  # [Dc, K-1+L]
    L = x.shape[0]
    out = torch.zeros(L, x.shape[1], dtype=torch.float64)
    for t in range(L):
        out[t] = (seq[:, t : t + K] * weight.double()).sum(-1)
        if bias is not None:
            out[t] += bias.double()
    if activation == "silu":
        out = F.silu(out)
    return out, seq[:, seq.shape[1] - (K - 1) :]


def attention_naive(q, k, v, scale, q_pos):
    """q [Lq, Hq, Dh], k/v [Lk, Hkv, Dh] contiguous context; query j sits at q_pos[j]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    rep = Hq // Hkv
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= torch.as_tensor(q_pos)[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block, and back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
