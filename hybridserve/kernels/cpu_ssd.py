"""The Mamba-2 SSD scan of one sequence piece on CPU, in C++: `ssd._scan_cpu`'s contract.

`scan_piece(x, dt, A, B, C, state)` takes one piece of one sequence (x [L, G, R, P], dt
[L, G, R] already softplus'd and clamped, A [G, R], B/C [L, G, N], state [G, R, P, N]) and
returns (y [L, G, R, P], the state after the piece [G, R, P, N]), all fp32, exactly what
`ssd._scan_cpu` computes, in chunks of 64 tokens:

    cum[t]    = sum of dt * A over the chunk up to t                       per head
    y[t]      = sum_{s <= t} (C[t] . B[s]) e^(cum[t] - cum[s]) dt[s] x[s]   the chunk itself
              + e^cum[t] C[t] . state                                       what entered it
    state'    = e^cum[end] state + sum_s e^(cum[end] - cum[s]) dt[s] x[s] (outer) B[s]

The torch version runs each term as one batched matmul over all chunks and heads (MKL: 64 x
64 x 64 products at ~47 GFLOP/s on an AMD EPYC core), with the [chunk, head, 64, 64] decays,
weights and states as tensors in memory between the passes. Here a head walks its chunks in
order with its state transposed ([N, P]) in a small buffer, so the state passing is a
multiply-add in cache and each chunk's weights are built, used and dropped while in L1; the
C.B scores are computed once per (chunk, B/C group) and shared by the group's heads. Every
product is one register-tiled loop (`mm_rows`): rows of A broadcast against 16-lane rows of
the right operand, 6 rows x 4 vectors of accumulators. Exponents are never positive (A < 0,
dt >= 0), so the polynomial exp the attention kernel uses applies.

Where it cannot be built, or HYBRIDSERVE_CPU_KERNELS=0, `usable()` is False and the caller
keeps `ssd._scan_cpu`.
"""
from __future__ import annotations

import torch

from hybridserve.kernels._cpp import EXP_NEG_CPP, NO_GIL_CPP, V16_CPP, CppKernel

CHUNK = 64

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
""" + EXP_NEG_CPP + V16_CPP + NO_GIL_CPP + r"""
constexpr int64_t CH = """ + str(CHUNK) + r""";   // tokens per chunk

// out[i][0:16 NV] = beta * out[i] + scale[i] * sum_k a[i lda + k] b[k ldb + 0:16 NV], for RT rows at once
template <int NV, int RT>
static inline void tile(int64_t Kd, const float* a, int64_t lda, const float* b, int64_t ldb, float* out,
                        int64_t ldo, const float* scale, float beta) {
  v16 acc[RT][NV];
  for (int r = 0; r < RT; ++r) for (int v = 0; v < NV; ++v) acc[r][v] = v16{};
  for (int64_t k = 0; k < Kd; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load16(b + k * ldb + 16 * v);
    for (int r = 0; r < RT; ++r) {
      const float av = a[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < RT; ++r) {
    const float sc = scale ? scale[r] : 1.0f;
    for (int v = 0; v < NV; ++v) {
      float* o = out + r * ldo + 16 * v;
      store16(o, beta == 0.0f ? acc[r][v] * sc : load16(o) * beta + acc[r][v] * sc);
    }
  }
}

template <int NV>
static void mm_rows_v(int64_t M, int64_t Kd, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* out, int64_t ldo, const float* scale, float beta) {
  constexpr int RT = NV <= 2 ? 8 : (NV <= 4 ? 6 : 2);
  int64_t i = 0;
  for (; i + RT <= M; i += RT)
    tile<NV, RT>(Kd, a + i * lda, lda, b, ldb, out + i * ldo, ldo, scale ? scale + i : nullptr, beta);
  for (; i < M; ++i)
    tile<NV, 1>(Kd, a + i * lda, lda, b, ldb, out + i * ldo, ldo, scale ? scale + i : nullptr, beta);
}

// out [M, n] = beta * out + diag(scale) * (a [M, Kd] @ b [Kd, n]); rows of each at their own stride
static void mm_rows(int64_t M, int64_t n, int64_t Kd, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* out, int64_t ldo, const float* scale, float beta) {
  switch (n % 16 == 0 ? n / 16 : 0) {
    case 1: return mm_rows_v<1>(M, Kd, a, lda, b, ldb, out, ldo, scale, beta);
    case 2: return mm_rows_v<2>(M, Kd, a, lda, b, ldb, out, ldo, scale, beta);
    case 4: return mm_rows_v<4>(M, Kd, a, lda, b, ldb, out, ldo, scale, beta);
    case 8: return mm_rows_v<8>(M, Kd, a, lda, b, ldb, out, ldo, scale, beta);
    default: break;
  }
  for (int64_t i = 0; i < M; ++i) {   // any other width: plain loops
    float* o = out + i * ldo;
    const float sc = scale ? scale[i] : 1.0f;
    for (int64_t j = 0; j < n; ++j) o[j] = beta == 0.0f ? 0.0f : o[j] * beta;
    std::vector<float> acc(n, 0.0f);
    for (int64_t k = 0; k < Kd; ++k) {
      const float av = a[i * lda + k];
      for (int64_t j = 0; j < n; ++j) acc[j] += av * b[k * ldb + j];
    }
    for (int64_t j = 0; j < n; ++j) o[j] += sc * acc[j];
  }
}

std::vector<torch::Tensor> scan_piece(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                      torch::Tensor C, torch::Tensor state) {
  NoGil no_gil;
  TORCH_CHECK(x.dim() == 4 && dt.dim() == 3 && A.dim() == 2 && B.dim() == 3 && C.dim() == 3 && state.dim() == 4,
              "scan_piece: x [L, G, R, P], dt [L, G, R], A [G, R], B/C [L, G, N], state [G, R, P, N]");
  for (auto* t : {&x, &dt, &A, &B, &C, &state})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32, "scan_piece: fp32 only");
  const int64_t L = x.size(0), G = x.size(1), R = x.size(2), P = x.size(3), N = B.size(2), H = G * R;
  TORCH_CHECK(x.stride(3) == 1 && x.stride(2) == P && x.stride(1) == R * P, "scan_piece: x rows must be [G, R, P] contiguous");
  TORCH_CHECK(B.stride(2) == 1 && B.stride(1) == N && C.stride(2) == 1 && C.stride(1) == N && C.size(2) == N &&
              B.size(0) == L && C.size(0) == L && B.size(1) == G && C.size(1) == G,
              "scan_piece: B and C rows must be [G, N] contiguous");
  TORCH_CHECK(dt.is_contiguous() && A.is_contiguous() && state.is_contiguous() && dt.size(0) == L &&
              dt.size(1) == G && dt.size(2) == R && A.size(0) == G && A.size(1) == R && state.size(0) == G &&
              state.size(1) == R && state.size(2) == P && state.size(3) == N, "scan_piece: shapes disagree");
  const int64_t nc = (L + CH - 1) / CH, lx = x.stride(0), lb = B.stride(0), lc_ = C.stride(0);
  auto y = torch::empty({L, G, R, P}, x.options());
  auto out_state = torch::empty({G, R, P, N}, x.options());
  auto cb = torch::zeros({G, nc, CH, CH}, x.options());   // C.B per (group, chunk); columns past a short chunk 0
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>(), *sp = state.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *op = out_state.data_ptr<float>(), *cbp = cb.data_ptr<float>();

  at::parallel_for(0, G * nc, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> bt(N * CH, 0.0f);   // B of the chunk transposed, [N, CH]
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / nc, c = w % nc, t0 = c * CH, len = std::min(CH, L - t0);
      std::fill(bt.begin(), bt.end(), 0.0f);
      for (int64_t s = 0; s < len; ++s)
        for (int64_t n = 0; n < N; ++n) bt[n * CH + s] = Bp[(t0 + s) * lb + g * N + n];
      mm_rows(len, CH, N, Cp + t0 * lc_ + g * N, lc_, bt.data(), CH, cbp + w * CH * CH, CH, nullptr, 0.0f);
    }
  });

  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> st(N * P), wt(CH * CH), bs(N * CH), cum(CH), ecum(CH), dts(CH);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / R;
      const float a = Ap[h];
      const float* s_in = sp + h * P * N;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) st[n * P + p] = s_in[p * N + n];   // the state as [N, P]
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t t0 = c * CH, len = std::min(CH, L - t0);
        float run = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
          dts[t] = dtp[(t0 + t) * H + h];
          run += dts[t] * a;
          cum[t] = run;
          ecum[t] = exp_neg(run);
        }
        const float* cbc = cbp + (g * nc + c) * CH * CH;
        for (int64_t t = 0; t < len; ++t) {   // weights of the chunk's own tokens, causal
          float* wr = wt.data() + t * CH;
          const float* cr = cbc + t * CH;
          const float ct = cum[t];
          for (int64_t s = 0; s < len; ++s)
            wr[s] = s <= t ? cr[s] * exp_neg(std::min(ct - cum[s], 0.0f)) * dts[s] : 0.0f;
        }
        const float* xc = xp + t0 * lx + h * P;
        float* yc = yp + (t0 * H + h) * P;
        const float* cc = Cp + t0 * lc_ + g * N;
        mm_rows(len, P, len, wt.data(), CH, xc, lx, yc, H * P, nullptr, 0.0f);
        mm_rows(len, P, N, cc, lc_, st.data(), P, yc, H * P, ecum.data(), 1.0f);
        const float last = cum[len - 1];
        for (int64_t s = 0; s < len; ++s) dts[s] *= exp_neg(std::min(last - cum[s], 0.0f));
        for (int64_t n = 0; n < N; ++n)
          for (int64_t s = 0; s < len; ++s) bs[n * CH + s] = Bp[(t0 + s) * lb + g * N + n] * dts[s];
        const float through = exp_neg(std::min(last, 0.0f));
        for (int64_t i = 0; i < N * P; ++i) st[i] *= through;
        mm_rows(N, P, len, bs.data(), CH, xc, lx, st.data(), P, nullptr, 1.0f);
      }
      float* s_out = op + h * P * N;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) s_out[p * N + n] = st[n * P + p];
    }
  });
  return {y, out_state};
}
"""

_KERNEL = CppKernel("hybridserve_cpu_ssd", _SOURCE, ["scan_piece"], "CPU SSD scan kernel")


def available() -> bool:
    return _KERNEL.available()


def usable(x: torch.Tensor) -> bool:
    """Whether `scan_piece` runs the C++ kernel for x (CPU, fp32, the extension built)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _KERNEL.module() is not None


def scan_piece(x, dt, A, B, C, state):
    """`ssd._scan_cpu` in C++: x [L, G, R, P], dt [L, G, R], A [G, R], B/C [L, G, N], state
    [G, R, P, N] (fp32) -> (y [L, G, R, P], state after the piece [G, R, P, N])."""
    L, G, R, P = x.shape
    N = B.shape[-1]
    if x.stride(-1) != 1 or x.stride(2) != P or x.stride(1) != R * P:
        x = x.contiguous()
    if B.stride(-1) != 1 or B.stride(1) != N:
        B = B.contiguous()
    if C.stride(-1) != 1 or C.stride(1) != N:
        C = C.contiguous()
    y, final = _KERNEL.module().scan_piece(x, dt.contiguous(), A.contiguous(), B, C, state.contiguous())
    return y, final
