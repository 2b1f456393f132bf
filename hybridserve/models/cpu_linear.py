"""Linears with oneDNN-packed weights, for fp32 inference on CPU.

The CPU decode step is mostly linears at small M (a batch of 8 rows against each
weight), where the default `F.linear` streams fp32 weights at ~7 GB/s on the dev
box. oneDNN with weights reordered once into its blocked layout ran the same
products 1.5-2x faster at M = 8 and 1.1-1.4x at prefill sizes (M = 64..2048),
with relative differences of ~1e-6 (accumulation order). vLLM's CPU backend packs
its weights the same way.

At one or two rows (batch-1 and batch-2 decode) which product wins depends on the
machine. On one dev box (11 GB/s single-thread reads) MKL's GEMV on the plain row-major
weight ran 1.3-1.7x faster than oneDNN's packed product (512x2192: 194 vs 240 us); on
an AMD EPYC box (35 GB/s) the packed product streamed 192 MB of weights at 25 GB/s
against MKL's 13 GB/s at one row and 22 against 8 at two (batch-1 decode of the small
hybrid: 66 -> 120 tok/s). So no fixed rule: while the model's linear weights are
small (at most DUAL_MAX_BYTES together), `prepack_linears` keeps the plain weights
too, times both products over the model's own linears at one and two rows
(`calibrate_plain_rows`: a few passes, well under a second), and keeps the plain copies
only for the row counts where they measured faster (`plain_max_rows`, 0-2); where
they lost, they are released.

`prepack_linears(model)` swaps every `nn.Linear` for a `PackedLinear` (the plain weight
is released unless it keeps it, or something else, e.g. a tied embedding, still holds
it). `HYBRIDSERVE_CPU_PREPACK`: `0` off, `packed` packed copies only, `dual` both
copies whatever their size and the plain one for up to PLAIN_MAX_ROWS rows, without
measuring; unset: measured as above up to DUAL_MAX_BYTES, else packed. The last
decision is in `LAST_CALIBRATION` (and the log). Never used where it does not apply
(non-CPU, non-fp32, or a torch without oneDNN).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

_ENV = "HYBRIDSERVE_CPU_PREPACK"
_BATCH_HINT = 64  # oneDNN's layout hint; 8..2048 measured the same, 1 was slower
PLAIN_MAX_ROWS = 2            # the most rows a plain copy is measured at and used for
DUAL_MAX_BYTES = 2 << 30      # linear weights (fp32) up to which both copies are kept by default
CALIBRATE_MAX_BYTES = 256 << 20   # weights timed per pass (an even sample of the linears beyond it)
PLAIN_MARGIN = 0.95           # the plain product must take under this share of the packed one's time
LAST_CALIBRATION: dict = {}   # the last `calibrate_plain_rows` result, for logs and benchmarks

log = logging.getLogger(__name__)


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
        self.plain_max_rows = PLAIN_MAX_ROWS if keep_plain else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.plain_max_rows:
            y = self.plain(flat)
        else:
            y = self.packed(flat)
        return y.view(*x.shape[:-1], self.out_features)

    def plain(self, flat: torch.Tensor) -> torch.Tensor:
        return F.linear(flat, self.plain_weight, self.bias)

    def packed(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")

    def drop_plain(self) -> None:
        self.plain_weight, self.plain_max_rows = None, 0

    def extra_repr(self) -> str:
        plain = f", plain copy for <= {self.plain_max_rows} rows" if self.plain_max_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed{plain}"


def keep_plain_copies(model: nn.Module) -> bool:
    """Whether `prepack_linears` keeps the plain weights too (see the module docstring)."""
    mode = os.environ.get(_ENV, "").strip().lower()
    if mode in ("dual", "packed"):
        return mode == "dual"
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear)
    return size <= DUAL_MAX_BYTES


def _sample(linears: list[PackedLinear], max_bytes: int) -> list[PackedLinear]:
    """An even sample of the linears whose plain weights add up to at most max_bytes (all if they fit)."""
    size = [m.plain_weight.numel() * m.plain_weight.element_size() for m in linears]
    if sum(size) <= max_bytes:
        return linears
    stride = sum(size) / max_bytes
    out, total = [], 0
    for i in range(0, len(linears), max(1, round(stride))):
        if total + size[i] > max_bytes and out:
            break
        out.append(linears[i])
        total += size[i]
    return out


def time_products(linears: list[PackedLinear], rows: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` seconds for one pass of the plain and of the packed product over
    `linears` at `rows` rows, the two alternating (so that drift on a noisy box hits both)."""
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    best = {"plain": float("inf"), "packed": float("inf")}
    with torch.no_grad():
        for rnd in range(repeats + 1):      # round 0 warms both up and is not kept
            for kind in best:
                t0 = time.perf_counter()
                for m in linears:
                    getattr(m, kind)(inputs[m.in_features])
                if rnd:
                    best[kind] = min(best[kind], time.perf_counter() - t0)
    return best["plain"], best["packed"]


def calibrate_plain_rows(linears: list[PackedLinear], timer=None) -> int:
    """The row count up to which the plain weights' product measured faster than the packed one
    (by PLAIN_MARGIN: the plain copy costs memory), checked at 1 row, then 2; 0 if it lost at 1."""
    timer = timer or time_products
    sample = _sample(linears, CALIBRATE_MAX_BYTES)
    rows, figures = 0, {}
    for r in range(1, PLAIN_MAX_ROWS + 1):
        plain_s, packed_s = timer(sample, r)
        figures[r] = {"plain_us": round(plain_s * 1e6, 1), "packed_us": round(packed_s * 1e6, 1)}
        if plain_s >= PLAIN_MARGIN * packed_s:
            break
        rows = r
    LAST_CALIBRATION.clear()
    LAST_CALIBRATION.update(plain_max_rows=rows, linears_timed=len(sample), rows=figures)
    log.info("CPU linears: plain weights for up to %d rows (timed over %d linears: %s)", rows, len(sample), figures)
    return rows


def prepack_linears(model: nn.Module, keep_plain: bool | None = None) -> int:
    """Replace every `nn.Linear` under `model` with a `PackedLinear` (keeping the plain weights
    as `keep_plain` says; None: `keep_plain_copies`, and unless told `dual`, only for the row
    counts where `calibrate_plain_rows` measured them faster); returns how many."""
    told = keep_plain is not None or os.environ.get(_ENV, "").strip().lower() == "dual"
    if keep_plain is None:
        keep_plain = keep_plain_copies(model)
    # Names only, so that each plain weight can be freed as soon as its module is swapped
    # (peak memory: the weights plus one packed copy, not two copies of everything).
    sites = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in sites:
        setattr(parent, name, PackedLinear(getattr(parent, name), keep_plain))
    if keep_plain and not told and sites:
        linears = [getattr(parent, name) for parent, name in sites]
        rows = calibrate_plain_rows(linears)
        for m in linears:
            if rows:
                m.plain_max_rows = rows
            else:
                m.drop_plain()
    return len(sites)
