"""RMSNorm and rotary embedding for the CPU, one C++ call each, with their torch references.

A decode step at batch 1 runs every layer's small ops on one row, where each torch op
costs its Python dispatch more than its arithmetic: the reference RMSNorm is seven ops
(24 us on a 576-wide row on an AMD EPYC box) and the rotary embedding five per tensor
(17 us), against a few microseconds for one C++ call doing the same. SmolLM2-135M runs 61
norms and 60 rotations per token. So on CPU in fp32 `rms_norm` and `rotary` call the
extension (built with the other CPU kernels' loader, `_cpp.CppKernel`); elsewhere, or where
it cannot be built, or with HYBRIDSERVE_CPU_KERNELS=0, they run the torch reference.
`rotary` rotates q and k in place on the C++ path (they are the step's fresh projections)
and returns them.
"""
from __future__ import annotations

import torch

from hybridserve.kernels._cpp import V16_CPP, CppKernel

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
""" + V16_CPP + r"""

// out[t] = (x[t] * rsqrt(mean(x[t]^2) + eps)) * w, rows of x D floats apart by x.stride(0)
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "rms_norm: x must be 2-D fp32 with contiguous rows");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.scalar_type() == torch::kFloat32 && w.size(0) == x.size(1),
              "rms_norm: weight must be [D] fp32");
  const int64_t T = x.size(0), D = x.size(1), ld = x.stride(0);
  auto out = torch::empty({T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* r = xp + t * ld;
      float* o = op + t * D;
      v16 acc = v16{};
      int64_t i = 0;
      for (; i + 16 <= D; i += 16) { const v16 v = load16(r + i); acc += v * v; }
      float ss = 0.0f;
      for (int j = 0; j < 16; ++j) ss += acc[j];
      for (; i < D; ++i) ss += r[i] * r[i];
      const float rstd = 1.0f / std::sqrt(ss / (float)D + (float)eps);
      i = 0;
      for (; i + 16 <= D; i += 16) store16(o + i, (load16(r + i) * rstd) * load16(wp + i));
      for (; i < D; ++i) o[i] = (r[i] * rstd) * wp[i];
    }
  });
  return out;
}

// x [T, H, Dh] (last dim contiguous, any other strides) rotated in place by cos/sin [T, Dh]
// (rows contiguous): HF's rotate_half, x1' = x1 c1 - x2 s1, x2' = x2 c2 + x1 s2 per half
static void rotate(torch::Tensor x, const float* c, const float* s, int64_t cs_ld) {
  const int64_t T = x.size(0), H = x.size(1), Dh = x.size(2), half = Dh / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, T * H, 64, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t t = it / H, h = it % H;
      float* r = xp + t * st + h * sh;
      const float* ct = c + t * cs_ld;
      const float* stt = s + t * cs_ld;
      for (int64_t i = 0; i < half; ++i) {
        const float a = r[i], bb = r[i + half];
        r[i] = a * ct[i] - bb * stt[i];
        r[i + half] = bb * ct[i + half] + a * stt[i + half];
      }
    }
  });
}

void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  for (auto* t : {&q, &k})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == torch::kFloat32 && t->stride(2) == 1 &&
                t->size(2) % 2 == 0, "rotary_: q and k must be [T, H, Dh] fp32 with Dh even and contiguous");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "rotary_: q and k disagree on T or Dh");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.is_contiguous() && sin.is_contiguous() && cos.numel() == q.size(0) * q.size(2) &&
              sin.numel() == cos.numel(), "rotary_: cos and sin must be contiguous fp32 [T, 1, Dh]");
  rotate(q, cos.data_ptr<float>(), sin.data_ptr<float>(), q.size(2));
  rotate(k, cos.data_ptr<float>(), sin.data_ptr<float>(), q.size(2));
}
"""

_KERNEL = CppKernel("hybridserve_cpu_ops", _SOURCE, ["rms_norm", "rotary_"], "CPU norm/rotary kernels")


def available() -> bool:
    return _KERNEL.available()


def _cpu_fp32(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and _KERNEL.module() is not None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, D] over D, times weight [D] (HF's order: normalised in fp32, then scaled)."""
    if x.dim() == 2 and x.stride(-1) == 1 and _cpu_fp32(x, weight) and weight.is_contiguous():
        return _KERNEL.module().rms_norm(x, weight, float(eps))
    return rms_norm_ref(x, weight, eps)


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) for the halves x1, x2 of
    the head dim: the sine terms are added half by half in place, with no rotated copy of x (3
    ops instead of 5; a 512-token prefill's q rotated in 153 instead of 664 us on one thread)."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, Hq, Dh] and k [T, Hkv, Dh] by position (cos/sin [T, 1, Dh]); on the C++
    path in place."""
    if (q.dim() == 3 and k.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1
            and cos.is_contiguous() and sin.is_contiguous() and _cpu_fp32(q, k, cos, sin)):
        _KERNEL.module().rotary_(q, k, cos, sin)
        return q, k
    return rotate_ref(q, cos, sin), rotate_ref(k, cos, sin)
