"""Linears with oneDNN-packed weights, for fp32 inference on CPU.

The CPU decode step is mostly linears at small M (a batch of 8 rows against each
weight), where the default `F.linear` streams fp32 weights at ~7 GB/s on the dev
box. oneDNN with weights reordered once into its blocked layout ran the same
products 1.5-2x faster at M = 8 and 1.1-1.4x at prefill sizes (M = 64..2048),
with relative differences of ~1e-6 (accumulation order). vLLM's CPU backend packs
its weights the same way.

At one or two rows (batch-1 and batch-2 decode) it is the other way round: MKL's
GEMV on the plain row-major weight ran 1.3-1.7x faster than oneDNN's packed product
(512x2192: 194 vs 240 us; 1024x512: 53 vs 86 us; one thread, any packing hint). So
while the model's linear weights are small (at most DUAL_MAX_BYTES together), each
`PackedLinear` also keeps the plain weight and takes it for up to PLAIN_MAX_ROWS rows:
twice the weight memory, for the fastest product at every batch size.

`prepack_linears(model)` swaps every `nn.Linear` for a `PackedLinear` (the plain weight
is released unless it keeps it, or something else, e.g. a tied embedding, still holds
it). `HYBRIDSERVE_CPU_PREPACK`: `0` off, `packed` packed copies only, `dual` both
copies whatever their size; unset: dual up to DUAL_MAX_BYTES, else packed. Never used
where it does not apply (non-CPU, non-fp32, or a torch without oneDNN).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_ENV = "HYBRIDSERVE_CPU_PREPACK"
_BATCH_HINT = 64  # oneDNN's layout hint; 8..2048 measured the same, 1 was slower
PLAIN_MAX_ROWS = 2            # rows up to which the plain weight's GEMV is the faster product
DUAL_MAX_BYTES = 2 << 30      # linear weights (fp32) up to which both copies are kept by default


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

    def __init__(self, linear: nn.Linear, keep_plain: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            plain = linear.weight.detach().contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(plain, _BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("plain_weight", plain if keep_plain else None, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.plain_weight is not None and flat.shape[0] <= PLAIN_MAX_ROWS:
            y = F.linear(flat, self.plain_weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plain = f", plain copy for <= {PLAIN_MAX_ROWS} rows" if self.plain_weight is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed{plain}"


def keep_plain_copies(model: nn.Module) -> bool:
    """Whether `prepack_linears` keeps the plain weights too (see the module docstring)."""
    mode = os.environ.get(_ENV, "").strip().lower()
    if mode in ("dual", "packed"):
        return mode == "dual"
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)
    return size <= DUAL_MAX_BYTES


def prepack_linears(model: nn.Module, keep_plain: bool | None = None) -> int:
    """Replace every `nn.Linear` under `model` with a `PackedLinear` (keeping the plain weights
    as `keep_plain` says; None: `keep_plain_copies`); returns how many."""
    if keep_plain is None:
        keep_plain = keep_plain_copies(model)
    # Names only, so that each plain weight can be freed as soon as its module is swapped
    # (peak memory: the weights plus one packed copy, not two copies of everything).
    sites = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in sites:
        setattr(parent, name, PackedLinear(getattr(parent, name), keep_plain))
    return len(sites)
