"""Gated RMSNorm, the Mamba-2 output norm: weight * rmsnorm(x * silu(z)).

Contract: the mean square is taken over groups of `group_size` consecutive
channels (None = all Dm channels, Hugging Face's GraniteMoeHybridRMSNormGated).
Math in fp32; the output is in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels import cpu_mamba
from hybridserve.kernels._backend import lazy_jit, next_pow2, tl, use_triton


def gated_rms_norm(
    x: torch.Tensor,  # [T, Dm]
    z: torch.Tensor | None,  # [T, Dm] gate, or None for a plain RMSNorm
    weight: torch.Tensor,  # [Dm]
    eps: float = 1e-6,
    group_size: int | None = None,
) -> torch.Tensor:
    """Returns weight * rmsnorm(x * silu(z)) as [T, Dm] in x.dtype."""
    Dm = x.shape[-1]
    if group_size is not None and (group_size <= 0 or Dm % group_size):
        raise ValueError(f"group_size={group_size} must divide the channel count {Dm}")
    if use_triton(x):
        return gated_rms_norm_triton(x, z, weight, eps, group_size)
    if cpu_mamba.gated_rms_norm_usable(x, z, weight):
        return cpu_mamba.gated_rms_norm_cpu(x, z, weight, eps, group_size)
    return gated_rms_norm_ref(x, z, weight, eps, group_size)


@lazy_jit
def _gated_rms_norm_kernel(
    # pointers
    x_ptr, z_ptr, w_ptr, out_ptr,
    # sizes
    group_size, eps,
    # strides
    x_t, z_t, out_t,
    # meta-parameters
    HAS_Z: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program: row t, channel group g (channels [g * group_size, (g + 1) * group_size))
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * group_size + tl.arange(0, BLOCK)  # [BLOCK]
    mask = tl.arange(0, BLOCK) < group_size
    h = tl.load(x_ptr + t * x_t + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + t * z_t + c, mask=mask, other=0.0).to(tl.float32)
        h = h * zv * tl.sigmoid(zv)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * out_t + c, (h * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm_triton(x, z, weight, eps=1e-6, group_size=None, num_warps=None):
    """Triton `gated_rms_norm`: one program per (row, channel group)."""
    shape = x.shape
    Dm = shape[-1]
    group_size = group_size or Dm
    x2 = x.reshape(-1, Dm)
    z2 = z.reshape(-1, Dm) if z is not None else x2
    if x2.stride(1) != 1 or z2.stride(1) != 1:
        x2, z2 = x2.contiguous(), z2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if x2.shape[0] == 0:
        return out.view(shape)
    block = next_pow2(group_size)
    num_warps = num_warps or min(16, max(1, block // 256))
    _gated_rms_norm_kernel[(x2.shape[0], Dm // group_size)](
        x2, z2, weight, out,
        group_size, eps,
        x2.stride(0), z2.stride(0), out.stride(0),
        HAS_Z=z is not None, BLOCK=block, num_warps=num_warps,
    )
    return out.view(shape)


def gated_rms_norm_ref(x, z, weight, eps=1e-6, group_size=None):
    """Torch reference of `gated_rms_norm`."""
    shape = x.shape
    Dm = shape[-1]
    group_size = group_size or Dm
    h = x.float()
    if z is not None:
        h = h * F.silu(z.float())
    h = h.reshape(-1, Dm // group_size, group_size)  # [T, groups, group_size]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.reshape(shape) * weight.float()).to(x.dtype)
