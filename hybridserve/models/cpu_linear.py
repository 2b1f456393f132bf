"""Linears for fp32 inference on CPU: oneDNN-packed weights, and for the few rows of a
decode step the product that measured fastest on this machine.

The CPU decode step is mostly linears at small M (one row per running sequence), bound by
how fast the weights stream from memory, and which product streams them fastest depends
on the machine:

* oneDNN with the weights reordered once into its blocked layout (`packed`) ran the
  products at M = 8 1.5-2x faster than the default `F.linear` on the first dev box, and
  1.1-1.4x at prefill sizes (M = 64..2048); vLLM's CPU backend packs its weights the same
  way. It is the product for every row count nobody measured faster.
* MKL's GEMV on the plain row-major weight (`plain`) ran 1.3-1.7x faster than `packed`
  at one or two rows on that box (11 GB/s reads), and half as fast on an AMD EPYC box.
* The C++ panel kernel (`panel`, kernels/cpu_gemm.py, up to 8 rows in one pass) read the
  weights at the `sum` rate (24 GB/s) on an AMD EPYC box where `packed` read 12-20 at one
  row and 8-15 at eight.

So no fixed rule. While the model's linear weights are small (at most DUAL_MAX_BYTES
together), `prepack_linears` keeps the plain weights beside the packed ones, times every
candidate over the model's own linears at 1, 2, 4 and 8 rows (`calibrate_routes`: an
even sample of at most CALIBRATE_MAX_BYTES, a few alternating passes, well under a
second for the small models) and gives each row count its winner (`route`): a product
that needs a second copy of the weights must beat `packed` by PLAIN_MARGIN, and row
counts between the timed ones take the winner at the next timed count up. The copies no
route uses are released.

`prepack_linears(model)` swaps every `nn.Linear` for a `PackedLinear`.
`HYBRIDSERVE_CPU_PREPACK`: `0` off, `packed` packed copies only, `dual` the plain copy
for up to PLAIN_MAX_ROWS rows, `panel` the panel copy for up to PANEL_MAX_ROWS rows
(both whatever the size, without measuring); unset: measured as above up to
DUAL_MAX_BYTES, else packed. The last decision is in `LAST_CALIBRATION` (and the log).
Never used where it does not apply (non-CPU, non-fp32, or a torch without oneDNN).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.kernels import cpu_gemm

_ENV = "HYBRIDSERVE_CPU_PREPACK"
_BATCH_HINT = 64  # oneDNN's layout hint; 8..2048 measured the same, 1 was slower
PLAIN_MAX_ROWS = 2            # the most rows the plain copy is timed at and used for
PANEL_MAX_ROWS = cpu_gemm.MAX_ROWS   # the most rows the panel kernel computes in one pass
CALIBRATE_ROWS = (1, 2, 4, 8)       # row counts timed; others take the next timed count up
DUAL_MAX_BYTES = 2 << 30      # linear weights (fp32) up to which the extra copies are kept to be timed
CALIBRATE_MAX_BYTES = 256 << 20   # weights timed per pass (an even sample of the linears beyond it)
PLAIN_MARGIN = 0.95           # a product with its own copy must take under this share of packed's time
LAST_CALIBRATION: dict = {}   # the last `calibrate_routes` result, for logs and benchmarks
MAX_ROWS = {"plain": PLAIN_MAX_ROWS, "panel": PANEL_MAX_ROWS}

log = logging.getLogger(__name__)


def prepack_available(device: str | torch.device, dtype: torch.dtype) -> bool:
    """True where packed linears apply: CPU, fp32, oneDNN present, not switched off."""
    if _mode() in ("0", "false", "no", "off"):
        return False
    ops = torch.ops.mkldnn
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


def _mode() -> str:
    return os.environ.get(_ENV, "").strip().lower()


def routes_upto(kind: str, rows: int) -> tuple[str, ...]:
    """A route that sends 1..rows rows to `kind` (index = row count; past its end: packed)."""
    return ("packed",) + (kind,) * rows


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W in oneDNN's packed layout (inference only), and optionally a
    plain and/or a panel copy of W for the row counts `route` sends to them."""

    def __init__(self, linear: nn.Linear, keep_plain: bool = False, panels: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            plain = linear.weight.detach().contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(plain, _BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("plain_weight", plain if keep_plain else None, persistent=False)
        self.register_buffer("panel_weight", cpu_gemm.pack_panels(plain) if panels else None, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.route: tuple[str, ...] = ("packed",)
        if panels:
            self.route = routes_upto("panel", PANEL_MAX_ROWS)
        elif keep_plain:
            self.route = routes_upto("plain", PLAIN_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layers pass 2-D rows: no reshape on the way in or view on the way out (a batch-1
        # decode step makes ~50 of these calls, each a few microseconds of Python)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        n = flat.shape[0]
        kind = self.route[n] if n < len(self.route) else "packed"
        if kind == "panel":
            y = self.panel(flat)
        elif kind == "plain":
            y = self.plain(flat)
        else:
            y = self.packed(flat)
        return y if flat is x else y.view(*x.shape[:-1], self.out_features)

    def plain(self, flat: torch.Tensor) -> torch.Tensor:
        return F.linear(flat, self.plain_weight, self.bias)

    def packed(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")

    def panel(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        return cpu_gemm.panel_linear(flat, self.panel_weight, self.bias, self.out_features)

    def ensure_panels(self) -> None:
        if self.panel_weight is None:
            self.panel_weight = cpu_gemm.pack_panels(self.plain_weight)

    def set_route(self, route: tuple[str, ...]) -> None:
        """Use `route` and release the copies it does not use (the plain one last: panels are made from it)."""
        if "panel" in route:
            self.ensure_panels()
        else:
            self.panel_weight = None
        if "plain" not in route:
            self.plain_weight = None
        self.route = tuple(route)

    def uses(self, kind: str) -> int:
        """How many leading row counts go to `kind` (0 if none)."""
        return sum(1 for k in self.route[1:] if k == kind)

    def extra_repr(self) -> str:
        extra = "".join(f", {k} copy for <= {self.uses(k)} rows" for k in ("plain", "panel") if self.uses(k))
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed{extra}"


def keep_plain_copies(model: nn.Module) -> bool:
    """Whether the model's linear weights are small enough (DUAL_MAX_BYTES) for their extra copies to be timed."""
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


def time_products(linears: list[PackedLinear], rows: int, kinds: list[str], repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` seconds for one pass of each product in `kinds` over `linears` at
    `rows` rows, the products alternating (so that drift on a noisy box hits them all)."""
    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    best = {k: float("inf") for k in kinds}
    with torch.no_grad():
        for rnd in range(repeats + 1):      # round 0 warms them up and is not kept
            for kind in kinds:
                t0 = time.perf_counter()
                for m in linears:
                    getattr(m, kind)(inputs[m.in_features])
                if rnd:
                    best[kind] = min(best[kind], time.perf_counter() - t0)
    return best


def calibrate_routes(sample: list[PackedLinear], kinds: list[str], timer=None) -> tuple[str, ...]:
    """Each row count's product, timed at CALIBRATE_ROWS over `sample` (linears holding the copies
    `kinds` need) among `kinds`: the fastest, if it is `packed` or beats it by PLAIN_MARGIN."""
    timer = timer or time_products
    winners, figures = {}, {}
    for r in CALIBRATE_ROWS:
        cands = ["packed"] + [k for k in kinds if k != "packed" and r <= MAX_ROWS[k]]
        if len(cands) == 1:
            winners[r] = "packed"
            continue
        took = timer(sample, r, cands)
        figures[r] = {f"{k}_us": round(took[k] * 1e6, 1) for k in cands}
        best = min(cands[1:], key=took.__getitem__)
        winners[r] = best if took[best] < PLAIN_MARGIN * took["packed"] else "packed"
    route = ("packed",) + tuple(winners[min(c for c in CALIBRATE_ROWS if c >= r)]
                                for r in range(1, max(CALIBRATE_ROWS) + 1))
    LAST_CALIBRATION.clear()
    LAST_CALIBRATION.update(route={r: route[r] for r in range(1, len(route))}, linears_timed=len(sample),
                            rows=figures)
    log.info("CPU linears by row count: %s (timed over %d linears: %s)",
             LAST_CALIBRATION["route"], len(sample), figures)
    return route


def prepack_linears(model: nn.Module, keep_plain: bool | None = None) -> int:
    """Replace every `nn.Linear` under `model` with a `PackedLinear`; returns how many.

    keep_plain True/False: keep the plain weights for 1-2 rows, or packed only (no measuring).
    None: HYBRIDSERVE_CPU_PREPACK, and unset, the products measured as the module says."""
    mode = _mode()
    measured = keep_plain is None and mode not in ("dual", "packed", "panel") and keep_plain_copies(model)
    panels_told = keep_plain is None and mode == "panel" and cpu_gemm.available()
    if keep_plain is None:
        keep_plain = measured or mode == "dual"
    # Names only, so that each plain weight can be freed as soon as its module is swapped
    # (peak memory: the weights plus one packed copy, not two copies of everything).
    sites = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in sites:
        setattr(parent, name, PackedLinear(getattr(parent, name), keep_plain or measured, panels_told))
    if measured and sites:
        linears = [getattr(parent, name) for parent, name in sites]
        kinds = ["plain"] + (["panel"] if cpu_gemm.available() else [])
        sample = _sample(linears, CALIBRATE_MAX_BYTES)
        if "panel" in kinds:
            for m in sample:
                m.ensure_panels()
        route = calibrate_routes(sample, kinds)
        for m in linears:
            m.set_route(route)
    return len(sites)
