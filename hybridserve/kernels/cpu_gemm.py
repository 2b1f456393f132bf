"""Linears at a few rows (decode) for the CPU, in C++: `y = x @ W.T + b` for x of 1-8 rows
(more in groups of 8), fp32, from W laid out in panels of 16 output columns.

A decode step is mostly weight products at 1-8 rows. They are bound by how fast the weights
stream from memory (at one row, two flops per 4-byte weight), and the libraries torch
carries do not always stream them at the machine's rate: on an AMD EPYC box oneDNN's packed
product read 12-20 GB/s at one row and 8-15 at eight, where a plain `sum` over the same
bytes read 25 (benchmarks/bench_cpu_gemm.py). This kernel reads W once per call, in a
single forward stream: `pack_panels` lays W [O, I] out as [ceil(O/16), I, 16] (output
columns padded with zeros to a multiple of 16), and a tile of P panels (16 P columns) by M
rows keeps its M x P accumulators in vector registers while it walks the inputs k: per k
it loads P vectors of W and adds x[m, k] times each into the rows' accumulators (M*P <= 24).
Tiles run on torch's intra-op threads (`at::parallel_for` over tiles of panels).

Which product a `PackedLinear` uses at which row count is measured when a model loads
(models/cpu_linear.py); this kernel is one of the candidates. Built with the other CPU
kernels' loader (`_cpp.CppKernel`); where it cannot be built, `available()` is False and
the candidates are the library's.
"""
from __future__ import annotations

import torch

from hybridserve.kernels._cpp import NO_GIL_CPP, V16_CPP, CppKernel

PANEL = 16       # output columns per panel (one 16-float vector)
MAX_ROWS = 8     # rows computed in one pass over W (more rows: groups of 8, W read again)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>

""" + NO_GIL_CPP + V16_CPP + r"""

// y[m, c0 : c0 + 16 P] for m < M from panels w (each I x 16, consecutive); cols: the columns
// that exist from c0 on (the last tile's padding columns are not stored)
template <int M, int P>
static void tile(const float* x, int64_t ldx, const float* w, int64_t I, const float* bias,
                 float* y, int64_t ldy, int64_t c0, int64_t cols) {
  v16 acc[M][P];
  for (int m = 0; m < M; ++m)
    for (int p = 0; p < P; ++p) acc[m][p] = v16{};
  const float* wp[P];
  for (int p = 0; p < P; ++p) wp[p] = w + p * I * 16;
  for (int64_t k = 0; k < I; ++k) {
    v16 wv[P];
    for (int p = 0; p < P; ++p) wv[p] = load16(wp[p] + k * 16);
    for (int m = 0; m < M; ++m) {
      const v16 xs = splat16(x[m * ldx + k]);
      for (int p = 0; p < P; ++p) acc[m][p] += xs * wv[p];
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t c = c0 + 16 * p;
    const int64_t n = std::min<int64_t>(16, cols - 16 * p);
    if (n <= 0) break;
    v16 b = v16{};
    if (bias) std::memcpy(&b, bias + c, n * sizeof(float));
    for (int m = 0; m < M; ++m) {
      const v16 out = acc[m][p] + b;
      std::memcpy(y + m * ldy + c, &out, n * sizeof(float));
    }
  }
}

typedef void (*tile_fn)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t,
                        int64_t, int64_t);

template <int M> static constexpr int panels_for() { return M <= 6 ? 4 : 3; }  // M * P <= 24

template <int M> static void rows_pass(const float* x, int64_t ldx, const float* w, int64_t I, int64_t O,
                                       const float* bias, float* y, int64_t ldy) {
  constexpr int P = panels_for<M>();
  const int64_t npan = (O + 15) / 16;
  const int64_t tiles = (npan + P - 1) / P;
  // grain: enough tiles per thread that a thread streams at least ~256 KB of W
  const int64_t grain = std::max<int64_t>(1, (int64_t)(65536 / std::max<int64_t>(1, I * 16 * P)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * P;
      const int64_t c0 = p0 * 16;
      const float* wt = w + p0 * I * 16;
      const int64_t left = npan - p0;
      const int64_t cols = O - c0;
      if (left >= P) {
        tile<M, P>(x, ldx, wt, I, bias, y, ldy, c0, cols);
      } else if (left == 3) {
        tile<M, 3>(x, ldx, wt, I, bias, y, ldy, c0, cols);
      } else if (left == 2) {
        tile<M, 2>(x, ldx, wt, I, bias, y, ldy, c0, cols);
      } else {
        tile<M, 1>(x, ldx, wt, I, bias, y, ldy, c0, cols);
      }
    }
  });
}

typedef void (*pass_fn)(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t);
static const pass_fn PASSES[9] = {nullptr, rows_pass<1>, rows_pass<2>, rows_pass<3>, rows_pass<4>,
                                  rows_pass<5>, rows_pass<6>, rows_pass<7>, rows_pass<8>};

// x [M, I] fp32 (rows contiguous), panels [ceil(O/16), I, 16], bias [O] or undefined -> [M, O]
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, c10::optional<torch::Tensor> bias, int64_t O) {
  NoGil no_gil;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "panel_linear: x must be 2-D fp32 with contiguous rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == 16 && panels.is_contiguous() &&
              panels.scalar_type() == torch::kFloat32, "panel_linear: panels must be [P, I, 16] contiguous fp32");
  const int64_t M = x.size(0), I = x.size(1);
  TORCH_CHECK(panels.size(1) == I, "panel_linear: x has ", I, " inputs, the panels ", panels.size(1));
  TORCH_CHECK(panels.size(0) == (O + 15) / 16, "panel_linear: ", panels.size(0), " panels for ", O, " outputs");
  const float* b = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == torch::kFloat32 && bc.numel() == O, "panel_linear: bias must be [O] fp32");
    b = bc.data_ptr<float>();
  }
  auto y = torch::empty({M, O}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m0);
    PASSES[rows](xp + m0 * x.stride(0), x.stride(0), panels.data_ptr<float>(), I, O, b, yp + m0 * O, O);
  }
  return y;
}
"""

_KERNEL = CppKernel("hybridserve_cpu_gemm", _SOURCE, ["panel_linear"], "CPU small-row linear kernel")


def available() -> bool:
    """Whether the kernel is built (building it now if it was not tried yet)."""
    return _KERNEL.available()


def why_unavailable() -> str | None:
    return _KERNEL.why_unavailable()


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [O, I] -> [ceil(O/16), I, 16]: panel p holds output columns 16p..16p+15 (zeros past O),
    input-major, so that a tile streams its panels front to back."""
    O, I = weight.shape
    pad = -O % PANEL
    w = weight.detach().float()
    if pad:
        w = torch.cat([w, w.new_zeros(pad, I)])
    return w.view(-1, PANEL, I).transpose(1, 2).contiguous()


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, I] (fp32, rows contiguous) -> x @ W.T + bias, [M, out_features], from `pack_panels(W)`."""
    mod = _KERNEL.module()
    if mod is None:
        raise RuntimeError(f"the CPU small-row linear kernel is unavailable ({why_unavailable()})")
    return mod.panel_linear(x, panels, bias, out_features)
