"""Gated RMSNorm, the Mamba-2 output norm: weight * rmsnorm(x * silu(z)).

Contract: the mean square is taken over groups of `group_size` consecutive
channels (None = all Dm channels, Hugging Face's GraniteMoeHybridRMSNormGated).
Math in fp32; the output is in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels._backend import use_triton


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
        from hybridserve.kernels.gated_rmsnorm_triton import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps, group_size)
    return gated_rms_norm_ref(x, z, weight, eps, group_size)


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
