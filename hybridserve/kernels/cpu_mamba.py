"""One decode step of a Mamba-2 mixer on CPU, between its two linears, as one C++ call.

Contract (`mamba_decode`): for each row b of `zxbcdt` [Bt, d_inner + conv_dim + H] (the
in_proj output, split as gate z | conv input xBC | dt) with slot i = state_indices[b]:

    xBC' = silu(bias + conv over conv_states[i] ++ xBC)      conv_states[i] shifted in place
    x, B, C = split(xBC')                                     [H, P], [G, N], [G, N]
    dt = softplus(dt + dt_bias)                               [H]
    state[i] = exp(dt * A) * state[i] + dt * x (outer) B      ssm_states[i] in place, [H, P, N]
    y = state[i] . C + D * x                                  [H, P]
    out[b] = norm_w * rmsnorm(y * silu(z))                    over all d_inner channels

which is what `causal_conv1d_update`, `selective_state_update` and `gated_rms_norm` do in
turn (`mamba_decode_ref` calls exactly those). At batch 1 those three refs are ~40 torch ops
per layer whose dispatch costs far more than their arithmetic (the state is 256 KiB a layer
for the small hybrid): the six mixers of small-hybrid spent ~1.5 ms of a 7 ms step outside
their linears at batch 1 and ~7 ms of 18 at batch 8 on one thread. The C++ step reads each
state once, updates it in place and leaves the gated-norm output ready for out_proj.

On CPU in fp32 (contiguous states, the kernel built) `mamba_decode` calls the extension; in
every other case, or with HYBRIDSERVE_CPU_KERNELS=0, it runs the reference.
"""
from __future__ import annotations

import torch

from hybridserve.kernels._cpp import EXP_NEG_CPP, NO_GIL_CPP, V16_CPP, CppKernel

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
""" + EXP_NEG_CPP + V16_CPP + NO_GIL_CPP + r"""
// v * sigmoid(v) from e^-|v| (cannot overflow); plain arithmetic, so loops over it vectorize
static inline float silu(float v) {
  const float e = exp_neg(v < 0.0f ? v : -v);
  return v * (v < 0.0f ? e : 1.0f) / (1.0f + e);
}
static inline float softplus(float v) { return v <= 20.0f ? std::log1p(std::exp(v)) : v; }

struct Shapes { int64_t d_inner, Dc, K, H, P, G, N, ld; };

// xc[0:Dc] = silu(bias + taps over the slot's K-1 previous inputs and this one); state shifted in place
static void conv_step(const float* xin, float* cs, const float* w, const float* bias, float* xc, const Shapes& s) {
  const int64_t km1 = s.K - 1;
  for (int64_t c = 0; c < s.Dc; ++c) {
    const float* wc = w + c * s.K;
    float* hist = cs + c * km1;
    float acc = xin[c] * wc[km1];
    for (int64_t k = 0; k < km1; ++k) acc += hist[k] * wc[k];
    if (bias) acc += bias[c];
    for (int64_t k = 0; k + 1 < km1; ++k) hist[k] = hist[k + 1];
    if (km1 > 0) hist[km1 - 1] = xin[c];
    xc[c] = acc;
  }
  for (int64_t c = 0; c < s.Dc; ++c) xc[c] = silu(xc[c]);
}

// one head's [P, N] state: decay, add dt*x (outer) B, y[p] = state[p] . C + D x[p]
static void head_step(float* st, const float* x, const float* B, const float* C, float dt, float decay,
                      float d, float* y, const Shapes& s) {
  for (int64_t p = 0; p < s.P; ++p) {
    float* row = st + p * s.N;
    const float dx = dt * x[p];
    v16 acc = v16{};
    int64_t n = 0;
    for (; n + 16 <= s.N; n += 16) {
      const v16 v = load16(row + n) * decay + dx * load16(B + n);
      store16(row + n, v);
      acc += v * load16(C + n);
    }
    float yp = hsum16(acc);
    for (; n < s.N; ++n) {
      const float v = row[n] * decay + dx * B[n];
      row[n] = v;
      yp += v * C[n];
    }
    y[p] = yp + d * x[p];
  }
}

// out[0:n] = w * rmsnorm(y * silu(z)) over each group of `group` channels (y may be out itself)
static void gated_norm(float* out, const float* y, const float* z, const float* w, double eps, int64_t n,
                       int64_t group) {
  for (int64_t i = 0; i < n; ++i) out[i] = y[i] * silu(z[i]);
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    v16 acc = v16{};   // 16 partial sums: a single running sum would be one dependent add per channel
    int64_t i = g0;
    for (; i + 16 <= g0 + group; i += 16) { const v16 v = load16(out + i); acc += v * v; }
    float ss = hsum16(acc);
    for (; i < g0 + group; ++i) ss += out[i] * out[i];
    const float rstd = 1.0f / std::sqrt(ss / (float)group + (float)eps);
    for (int64_t i = g0; i < g0 + group; ++i) out[i] = (out[i] * rstd) * w[i];
  }
}

torch::Tensor mamba_decode(torch::Tensor zxbcdt, torch::Tensor conv_states, torch::Tensor ssm_states,
                           torch::Tensor slots, torch::Tensor conv_w, torch::Tensor conv_b,
                           torch::Tensor dt_bias, torch::Tensor A, torch::Tensor D, torch::Tensor norm_w,
                           int64_t d_inner, int64_t n_groups, double eps) {
  NoGil no_gil;
  for (auto* t : {&conv_states, &ssm_states, &conv_w, &dt_bias, &A, &D, &norm_w})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "mamba_decode: states and parameters must be contiguous fp32");
  TORCH_CHECK(zxbcdt.dim() == 2 && zxbcdt.scalar_type() == torch::kFloat32 && zxbcdt.stride(1) == 1,
              "mamba_decode: zxbcdt must be [Bt, d_inner + conv_dim + H] fp32 with contiguous rows");
  TORCH_CHECK(ssm_states.dim() == 4 && conv_states.dim() == 3 && conv_w.dim() == 2,
              "mamba_decode: ssm_states [slots, H, P, N], conv_states [slots, Dc, K-1], conv_w [Dc, K]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1 && slots.size(0) == zxbcdt.size(0),
              "mamba_decode: slots must be [Bt] int64");
  Shapes s{d_inner, conv_w.size(0), conv_w.size(1), ssm_states.size(1), ssm_states.size(2), n_groups,
           ssm_states.size(3), zxbcdt.stride(0)};
  TORCH_CHECK(s.H * s.P == d_inner && s.Dc == d_inner + 2 * s.G * s.N && s.G > 0 && s.H % s.G == 0,
              "mamba_decode: d_inner, groups and state shapes disagree");
  TORCH_CHECK(zxbcdt.size(1) == d_inner + s.Dc + s.H && conv_states.size(1) == s.Dc &&
              conv_states.size(2) == s.K - 1 && norm_w.numel() == d_inner && A.numel() == s.H &&
              D.numel() == s.H && dt_bias.numel() == s.H,
              "mamba_decode: zxbcdt, conv state or parameter sizes disagree with the layer");
  const bool has_bias = conv_b.numel() > 0;
  TORCH_CHECK(!has_bias || (conv_b.scalar_type() == torch::kFloat32 && conv_b.is_contiguous() &&
              conv_b.numel() == s.Dc), "mamba_decode: conv bias must be [Dc] fp32");
  const int64_t Bt = zxbcdt.size(0), num_slots = ssm_states.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < Bt; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < num_slots && sl[b] < conv_states.size(0), "mamba_decode: slot out of range");
  auto out = torch::empty({Bt, d_inner}, zxbcdt.options());
  const float* zp = zxbcdt.data_ptr<float>();
  float* csp = conv_states.data_ptr<float>();
  float* ssp = ssm_states.data_ptr<float>();
  const float* wp = conv_w.data_ptr<float>();
  const float* bp = has_bias ? conv_b.data_ptr<float>() : nullptr;
  const float *dtb = dt_bias.data_ptr<float>(), *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t heads_per_group = s.H / s.G, state_size = s.H * s.P * s.N;
  at::parallel_for(0, Bt, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xc(s.Dc);
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = zp + b * s.ld;
      const float *z = row, *dt_raw = row + d_inner + s.Dc;
      conv_step(row + d_inner, csp + sl[b] * s.Dc * (s.K - 1), wp, bp, xc.data(), s);
      float* y = op + b * d_inner;
      float* st = ssp + sl[b] * state_size;
      for (int64_t h = 0; h < s.H; ++h) {
        const int64_t g = h / heads_per_group;
        const float dt = softplus(dt_raw[h] + dtb[h]);
        const float* B = xc.data() + d_inner + g * s.N;
        const float* C = xc.data() + d_inner + s.G * s.N + g * s.N;
        head_step(st + h * s.P * s.N, xc.data() + h * s.P, B, C, dt, std::exp(dt * Ap[h]), Dp[h], y + h * s.P, s);
      }
      gated_norm(y, y, z, nw, eps, d_inner, d_inner);
    }
  });
  return out;
}

// out [T, D] = w * rmsnorm(y * silu(z)) per row and group of channels; y, z rows contiguous, any row stride
torch::Tensor gated_rms_norm(torch::Tensor y, torch::Tensor z, torch::Tensor w, double eps, int64_t group) {
  NoGil no_gil;
  TORCH_CHECK(y.dim() == 2 && z.dim() == 2 && y.sizes() == z.sizes() && y.stride(1) == 1 && z.stride(1) == 1 &&
              y.scalar_type() == torch::kFloat32 && z.scalar_type() == torch::kFloat32,
              "gated_rms_norm: y and z must be [T, D] fp32 with contiguous rows");
  const int64_t T = y.size(0), D = y.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == D && group > 0 &&
              D % group == 0, "gated_rms_norm: weight must be [D] fp32 and the group must divide D");
  auto out = torch::empty({T, D}, y.options());
  const float *yp = y.data_ptr<float>(), *zp = z.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ly = y.stride(0), lz = z.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gated_norm(op + t * D, yp + t * ly, zp + t * lz, wp, eps, D, group);
  });
  return out;
}

// Causal depthwise conv over packed sequences (prefill): out[t] = act(bias + sum_k w[:, k] x[t-K+1+k]),
// inputs before a sequence's first token from its slot's conv state (or zeros); the state is then
// set to the sequence's last K-1 inputs (older state columns where the sequence is shorter).
torch::Tensor causal_conv1d(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor conv_states,
                            torch::Tensor cu, torch::Tensor slots, torch::Tensor has_init, bool act) {
  NoGil no_gil;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "causal_conv1d: x must be [T, Dc] fp32 with contiguous rows");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.size(0) == x.size(1),
              "causal_conv1d: weight must be [Dc, K] fp32");
  TORCH_CHECK(conv_states.dim() == 3 && conv_states.is_contiguous() && conv_states.scalar_type() == torch::kFloat32 &&
              conv_states.size(1) == x.size(1) && conv_states.size(2) == w.size(1) - 1,
              "causal_conv1d: conv_states must be contiguous fp32 [slots, Dc, K-1]");
  TORCH_CHECK(cu.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
              has_init.scalar_type() == torch::kBool && cu.numel() == slots.numel() + 1 &&
              has_init.numel() == slots.numel() && cu.is_contiguous() && slots.is_contiguous() &&
              has_init.is_contiguous(), "causal_conv1d: cu_seqlens [S+1], slots [S] int64, has_initial_state [S] bool");
  const int64_t T = x.size(0), Dc = x.size(1), K = w.size(1), km1 = K - 1, S = slots.numel(), ld = x.stride(0);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == Dc),
              "causal_conv1d: bias must be [Dc] fp32");
  const int64_t *cp = cu.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>();
  const bool* hp = has_init.data_ptr<bool>();
  TORCH_CHECK(cp[0] == 0 && cp[S] == T, "causal_conv1d: cu_seqlens must run from 0 to T");
  for (int64_t i = 0; i < S; ++i)
    TORCH_CHECK(cp[i] <= cp[i + 1] && sp[i] >= 0 && sp[i] < conv_states.size(0), "causal_conv1d: bad cu_seqlens or slot");
  auto wt = w.t().contiguous();  // [K, Dc]: tap k of every channel in one row
  auto out = torch::empty({T, Dc}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = wt.data_ptr<float>(), *bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float *op = out.data_ptr<float>(), *csp = conv_states.data_ptr<float>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t start = cp[s], L = cp[s + 1] - start;
    float* st = csp + sp[s] * Dc * km1;
    std::vector<float> prev(km1 * Dc, 0.0f);  // [K-1, Dc]: the inputs before the sequence
    if (hp[s])
      for (int64_t c = 0; c < Dc; ++c)
        for (int64_t j = 0; j < km1; ++j) prev[j * Dc + c] = st[c * km1 + j];
    // input row i of (prev ++ sequence), i in [0, K-1+L)
    auto row = [&](int64_t i) { return i < km1 ? prev.data() + i * Dc : xp + (start + i - km1) * ld; };
    at::parallel_for(0, L, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* o = op + (start + t) * Dc;
        if (bp) std::memcpy(o, bp, Dc * sizeof(float)); else std::fill(o, o + Dc, 0.0f);
        for (int64_t k = 0; k < K; ++k) {
          const float* in = row(t + k);
          const float* wk = wp + k * Dc;
          for (int64_t c = 0; c < Dc; ++c) o[c] += wk[c] * in[c];
        }
        if (act) for (int64_t c = 0; c < Dc; ++c) o[c] = silu(o[c]);
      }
    });
    for (int64_t j = 0; j < km1; ++j) {  // new state column j: input row L + j of (prev ++ sequence)
      const float* in = row(L + j);
      for (int64_t c = 0; c < Dc; ++c) st[c * km1 + j] = in[c];
    }
  }
  return out;
}
"""

_KERNEL = CppKernel("hybridserve_cpu_mamba", _SOURCE, ["mamba_decode", "gated_rms_norm", "causal_conv1d"],
                    "CPU Mamba kernels")


def available() -> bool:
    return _KERNEL.available()


def usable(zxbcdt: torch.Tensor, conv_states: torch.Tensor, ssm_states: torch.Tensor) -> bool:
    """Whether `mamba_decode` takes the C++ path for these tensors."""
    return (zxbcdt.dim() == 2 and zxbcdt.stride(-1) == 1 and conv_states.is_contiguous()
            and ssm_states.is_contiguous() and _fp32_cpu(zxbcdt, conv_states, ssm_states))


def mamba_decode(
    zxbcdt: torch.Tensor,  # [Bt, d_inner + conv_dim + H] in_proj output: gate | xBC | dt
    conv_states: torch.Tensor,  # [num_slots, conv_dim, K-1], shifted in place
    ssm_states: torch.Tensor,  # [num_slots, H, P, N], updated in place
    state_indices: torch.Tensor,  # [Bt] int64
    conv_weight: torch.Tensor,  # [conv_dim, K]
    conv_bias: torch.Tensor | None,  # [conv_dim]
    dt_bias: torch.Tensor,  # [H]
    A: torch.Tensor,  # [H] (negative: -exp(A_log))
    D: torch.Tensor,  # [H]
    norm_weight: torch.Tensor,  # [d_inner]
    *,
    n_groups: int,
    eps: float,
) -> torch.Tensor:
    """Conv, state update and gated norm of one decode token per row; returns [Bt, d_inner]."""
    d_inner = norm_weight.shape[0]
    if usable(zxbcdt, conv_states, ssm_states) and _fp32_cpu(conv_weight, dt_bias, A, D, norm_weight):
        bias = conv_bias if conv_bias is not None else torch.empty(0)
        return _KERNEL.module().mamba_decode(
            zxbcdt, conv_states, ssm_states, state_indices.to(torch.int64), conv_weight.contiguous(),
            bias.contiguous(), dt_bias.contiguous(), A.contiguous(), D.contiguous(), norm_weight.contiguous(),
            d_inner, n_groups, float(eps))
    return mamba_decode_ref(zxbcdt, conv_states, ssm_states, state_indices, conv_weight, conv_bias, dt_bias,
                            A, D, norm_weight, n_groups=n_groups, eps=eps)


def mamba_decode_ref(zxbcdt, conv_states, ssm_states, state_indices, conv_weight, conv_bias, dt_bias, A, D,
                     norm_weight, *, n_groups: int, eps: float) -> torch.Tensor:
    """Torch reference of `mamba_decode`: the three decode refs in turn."""
    from hybridserve.kernels.conv1d import causal_conv1d_update_ref   # they route to this module
    from hybridserve.kernels.gated_rmsnorm import gated_rms_norm_ref
    from hybridserve.kernels.state_update import selective_state_update_ref

    Bt = zxbcdt.shape[0]
    H, P, N = ssm_states.shape[1:]
    d_inner, conv_dim = H * P, conv_states.shape[1]
    gate, xbc, dt = zxbcdt.split([d_inner, conv_dim, H], dim=-1)
    xbc = causal_conv1d_update_ref(xbc, conv_states, conv_weight, conv_bias, state_indices=state_indices,
                                   activation="silu")
    x, b, c = xbc.split([d_inner, n_groups * N, n_groups * N], dim=-1)
    y = selective_state_update_ref(ssm_states, x.reshape(Bt, H, P), dt, A, b.reshape(Bt, n_groups, N),
                                   c.reshape(Bt, n_groups, N), D, dt_bias=dt_bias, dt_softplus=True,
                                   state_indices=state_indices)
    return gated_rms_norm_ref(y.reshape(Bt, d_inner), gate, norm_weight, eps)


def _fp32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and _KERNEL.module() is not None


def gated_rms_norm_usable(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor) -> bool:
    return (z is not None and x.dim() == 2 and z.shape == x.shape and x.stride(-1) == 1 and z.stride(-1) == 1
            and _fp32_cpu(x, z, weight))


def gated_rms_norm_cpu(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                       group_size: int | None) -> torch.Tensor:
    """`gated_rms_norm` of x, z [T, Dm] (rows contiguous, any row stride) in one C++ pass."""
    return _KERNEL.module().gated_rms_norm(x, z, weight.contiguous(), float(eps), group_size or x.shape[1])


def causal_conv1d_usable(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(-1) == 1 and conv_states.is_contiguous() and _fp32_cpu(x, weight, conv_states)


def causal_conv1d_cpu(x, weight, bias, *, conv_states, cu_seqlens, state_indices, has_initial_state,
                      activation) -> torch.Tensor:
    """`causal_conv1d` over packed sequences in one C++ pass per sequence (x [T, Dc], rows contiguous)."""
    return _KERNEL.module().causal_conv1d(
        x, weight.float(), bias.float().contiguous() if bias is not None else torch.empty(0), conv_states,
        cu_seqlens.to(torch.int64).contiguous(), state_indices.to(torch.int64).contiguous(),
        has_initial_state.to(torch.bool).contiguous(), activation is not None)
