"""Linears with oneDNN-packed weights, for fp32 inference on CPU.

The CPU decode step is mostly linears at small M (a batch of 8 rows against each
weight), where the default `F.linear` streams fp32 weights at ~7 GB/s on the dev
box. oneDNN with weights reordered once into its blocked layout ran the same
products 1.5-2x faster at M = 8 and 1.1-1.4x at prefill sizes (M = 64..2048),
with relative differences of ~1e-6 (accumulation order). vLLM's CPU backend packs
its weights the same way.

`prepack_linears(model)` swaps every `nn.Linear` for a `PackedLinear` holding only
the packed copy (the plain weight is released unless something else, e.g. a tied
embedding, still holds it). Off with `HYBRIDSERVE_CPU_PREPACK=0`, and never used
where it does not apply (non-CPU, non-fp32, or a torch without oneDNN).
"""
from __future__ import annotations

import os

import torch
from torch import nn

_ENV = "HYBRIDSERVE_CPU_PREPACK"
_BATCH_HINT = 64  # oneDNN's layout hint; 8..2048 measured the same, 1 was slower


def prepack_available(device: str | torch.device, dtype: torch.dtype) -> bool:
    """True where packed linears apply: CPU, fp32, oneDNN present, not switched off."""
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    ops = torch.ops.mkldnn
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), _BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def prepack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` under `model` with a `PackedLinear`; returns how many."""
    # Names only, so that each plain weight can be freed as soon as its module is swapped
    # (peak memory: the weights plus one packed copy, not two copies of everything).
    sites = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in sites:
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    return len(sites)
