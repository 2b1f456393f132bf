"""Attention for the CPU, in C++: paged decode (K/V read where they lie in the cache) and
prefill (causal attention of a chunk over its whole context).

The torch reference (`paged_attention_decode_ref`) gathers every sequence's blocks into
a contiguous copy and runs SDPA over it: at long context that moves each K/V byte
three times (gather read, gather write, SDPA read) and SDPA adds its own masked pass.
This kernel walks each sequence's block table instead and, per (sequence, kv head),
keeps the Hq // Hkv query heads of the group in registers' reach: per cache block it
scores the block's tokens against them, rescales the running output by the new
maximum (online softmax), and adds the block's values. Each K/V byte is read once.
Head sizes that are a multiple of 16 (up to 256, with up to 8 query heads per kv head)
take a 16-lane path (`paged_decode16`): a head's scores of 16 tokens as one vector, the
G heads of a kv head sharing each load of K and V, at one thread on an AMD EPYC box
13-15 GB/s from memory where the 8-lane path read 6.5 (8 x 8192 tokens: 10.4 -> 4.6 ms,
benchmarks/bench_cpu_attention.py). It walks the context in segments of ~256 KB of K
and V, each read once with nothing else to do (a read that waits behind the scoring
arithmetic ran at half a plain read's rate on a Zen 5 box, and prefetch hints did not
close that gap), then scored, softmaxed and summed from L2 with one rescale per segment.
In a SmolLM2 decode step at 2048 tokens (30 layers, cache in memory) that took attention
from 5.6 to 3.9 ms per step.

The prefill entry (`prefill_attention_cpu`) takes a sequence's gathered K/V and computes a
tile of query rows (the kv group's heads at consecutive positions) against 64-key blocks
with an online softmax, the tile's scores and outputs in vector registers and K transposed
once per kv head. torch's fused CPU attention, which it replaces on CPU, runs its block
products through MKL; on AMD CPUs MKL takes a generic path (60-80 GFLOP/s where these FMA
units do ~200), and the kernel measured 2.0-3.4x faster there (benchmarks/bench_cpu_attention.py
--prefill). `HYBRIDSERVE_CPU_PREFILL_ATTENTION=0` keeps torch's for prefill alone.

It is compiled on first use with torch's C++ extension loader (g++, and ninja from the
system or from the `ninja` package hybridserve depends on; cached under torch's extension
directory, about 25 s the first time; the name carries the CPU model because it is built
with -march=native; the native engine builds it while loading a model) and runs on torch's intra-op threads (`at::parallel_for` over
sequence × kv head). Where it cannot be built, or HYBRIDSERVE_CPU_KERNELS=0, or the
cache is not fp32, the caller keeps the torch reference; `available()` says which.
"""
from __future__ import annotations

import os

import torch

from hybridserve.kernels._cpp import EXP_NEG_CPP, NO_GIL_CPP, V16_CPP, CppKernel


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

"""+ EXP_NEG_CPP + NO_GIL_CPP + r"""
// Head sizes that are a multiple of 8 up to 256 take these: the head's accumulators live in
// vector registers across a block's tokens (GCC/Clang vector extensions: AVX on x86, NEON
// pairs on ARM), and the G query heads that share a kv head are scored off one load of K.
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
static inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
static inline float hsum8(v8 v) {
  v8 t = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  t = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5);
  t = t + __builtin_shufflevector(t, t, 1, 0, 3, 2, 5, 4, 7, 6);
  return t[0];
}

// s[t * H + h] = q_h . k_t for the block's cnt tokens; heads h = kv head * G + j
template <int NV>
static void block_scores(const float* kb, int64_t tok_stride, int64_t cnt, const float* qs,
                         int64_t H, int64_t G, float* s) {
  for (int64_t t = 0; t < cnt; ++t) {
    for (int64_t g = 0; g < H / G; ++g) {
      const float* kt = kb + t * tok_stride + g * NV * 8;
      v8 k[NV];
      for (int i = 0; i < NV; ++i) k[i] = load8(kt + 8 * i);
      for (int64_t j = 0; j < G; ++j) {
        const float* qh = qs + (g * G + j) * NV * 8;
        v8 a0 = k[0] * load8(qh), a1 = NV > 1 ? k[1] * load8(qh + 8) : v8{};
        for (int i = 2; i < NV; i += 2) {
          a0 += k[i] * load8(qh + 8 * i);
          if (i + 1 < NV) a1 += k[i + 1] * load8(qh + 8 * (i + 1));
        }
        s[t * H + g * G + j] = hsum8(a0 + a1);
      }
    }
  }
}

// acc_h += sum_t p[t * H + h] * v_t for every head of the item
template <int NV>
static void block_values(const float* vb, int64_t tok_stride, int64_t cnt, const float* p,
                         int64_t H, int64_t G, float* acc) {
  for (int64_t h = 0; h < H; ++h) {
    v8 a[NV];
    float* ah = acc + h * NV * 8;
    for (int i = 0; i < NV; ++i) a[i] = load8(ah + 8 * i);
    const float* vh = vb + (h / G) * NV * 8;
    for (int64_t t = 0; t < cnt; ++t) {
      const float pt = p[t * H + h];
      const float* vt = vh + t * tok_stride;
      for (int i = 0; i < NV; ++i) a[i] += pt * load8(vt + 8 * i);
    }
    for (int i = 0; i < NV; ++i) store8(ah + 8 * i, a[i]);
  }
}

typedef void (*scores_fn)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
typedef void (*values_fn)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);

template <int NV> static void pick(int64_t D, scores_fn* sf, values_fn* vf) {
  if constexpr (NV > 0) {
    if (D == NV * 8) { *sf = block_scores<NV>; *vf = block_values<NV>; return; }
    pick<NV - 1>(D, sf, vf);
  }
}

// What both decode entries check and derive from their arguments (the tensors kept alive here).
struct DecodeSetup {
  torch::Tensor out, tables, lens;
  int64_t B, Hq, D, BS, Hkv, G, bt_stride, tok_stride, blk_stride;
  const float *qp, *kp, *vp;
  const int32_t *bt, *cl;
  float* op;
  float sc;
};

static DecodeSetup decode_setup(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 &&
              v_cache.dtype() == torch::kFloat32, "paged_decode: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: contiguous tensors only");
  TORCH_CHECK(block_tables.dtype() == torch::kInt32 && context_lens.dtype() == torch::kInt32,
              "paged_decode: int32 block tables and lengths");
  DecodeSetup c;
  c.B = q.size(0); c.Hq = q.size(1); c.D = q.size(2);
  c.BS = k_cache.size(1); c.Hkv = k_cache.size(2);
  TORCH_CHECK(c.Hq % c.Hkv == 0 && k_cache.size(3) == c.D, "paged_decode: shapes do not agree");
  c.G = c.Hq / c.Hkv;
  c.out = torch::empty_like(q);
  c.tables = block_tables.contiguous();
  c.lens = context_lens.contiguous();
  c.qp = q.data_ptr<float>(); c.kp = k_cache.data_ptr<float>(); c.vp = v_cache.data_ptr<float>();
  c.bt = c.tables.data_ptr<int32_t>(); c.cl = c.lens.data_ptr<int32_t>();
  c.op = c.out.data_ptr<float>();
  c.bt_stride = c.tables.size(1); c.tok_stride = c.Hkv * c.D; c.blk_stride = c.BS * c.Hkv * c.D;
  c.sc = static_cast<float>(scale);
  return c;
}

// Work items: a sequence's kv heads [g0, g1), split into head ranges only when there are fewer
// sequences than threads; `parts` ranges of `per` kv heads each
static void decode_parts(const DecodeSetup& c, int64_t* parts, int64_t* per) {
  const int64_t threads = at::get_num_threads();
  *parts = std::min<int64_t>(c.Hkv, (threads + c.B - 1) / std::max<int64_t>(c.B, 1));
  *per = (c.Hkv + *parts - 1) / *parts;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  NoGil no_gil;
  const DecodeSetup c = decode_setup(q, k_cache, v_cache, block_tables, context_lens, scale);
  const int64_t Hq = c.Hq, D = c.D, BS = c.BS, Hkv = c.Hkv, G = c.G;
  const int64_t bt_stride = c.bt_stride, tok_stride = c.tok_stride, blk_stride = c.blk_stride;
  const float *qp = c.qp, *kp = c.kp, *vp = c.vp;
  const int32_t *bt = c.bt, *cl = c.cl;
  float* op = c.op;
  const float sc = c.sc;
  scores_fn fixed_scores = nullptr;
  values_fn fixed_values = nullptr;
  pick<32>(D, &fixed_scores, &fixed_values);           // D = 8, 16, ..., 256

  // A work item (decode_parts) reads each token's K/V for its kv heads as one contiguous run,
  // block after block.
  int64_t parts, per;
  decode_parts(c, &parts, &per);
  at::parallel_for(0, c.B * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(Hq * D), acc(Hq * D), m(Hq), l(Hq), s(BS * Hq), mm(BS * Hq);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / parts, g0 = (i % parts) * per, g1 = std::min(Hkv, g0 + per);
      if (g0 >= g1) continue;
      const int64_t H = (g1 - g0) * G;                // query heads of this item
      const int64_t n = cl[b];
      const float* qb = qp + (b * Hq + g0 * G) * D;
      for (int64_t x = 0; x < H * D; ++x) qs[x] = qb[x] * sc;
      std::fill(acc.begin(), acc.begin() + H * D, 0.0f);
      std::fill(m.begin(), m.begin() + H, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + H, 0.0f);
      for (int64_t start = 0; start < n; start += BS) {
        const int64_t blk = bt[b * bt_stride + start / BS];
        const int64_t cnt = std::min(BS, n - start);
        if (start + BS < n) {
          // a next block that is not this one's neighbour: touch a few of its rows now, so its
          // page walk and the hardware prefetcher start before it is read (measured: a block
          // table in random order went from ~17 to ~15 ms at 8K x 8; prefetching every line
          // cost more than it saved)
          const int64_t nxt = bt[b * bt_stride + start / BS + 1];
          if (nxt != blk + 1)
            for (int64_t t = 0; t < BS; t += 4) {
              __builtin_prefetch(kp + nxt * blk_stride + t * tok_stride + g0 * D);
              __builtin_prefetch(vp + nxt * blk_stride + t * tok_stride + g0 * D);
            }
        }
        const float* kb = kp + blk * blk_stride + g0 * D;
        const float* vb = vp + blk * blk_stride + g0 * D;
        if (fixed_scores) fixed_scores(kb, tok_stride, cnt, qs.data(), H, G, s.data());
        else for (int64_t t = 0; t < cnt; ++t) {       // scores of this block's tokens
          const float* kt = kb + t * tok_stride;
          for (int64_t h = 0; h < H; ++h) {
            const float* qh = qs.data() + h * D;
            const float* kh = kt + (h / G) * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qh[d] * kh[d];
            s[t * H + h] = dot;
          }
        }
        for (int64_t h = 0; h < H; ++h) {              // new running max; rescale what is summed
          float mx = m[h];
          for (int64_t t = 0; t < cnt; ++t) mx = std::max(mx, s[t * H + h]);
          const float corr = std::isinf(m[h]) ? 0.0f : exp_neg(m[h] - mx);
          if (corr != 1.0f) {
            l[h] *= corr;
            float* ah = acc.data() + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] *= corr;
          }
          m[h] = mx;
        }
        for (int64_t t = 0; t < cnt; ++t)              // each score's head max, laid out like s
          for (int64_t h = 0; h < H; ++h) mm[t * H + h] = m[h];
        const int64_t ns = cnt * H;
#pragma omp simd
        for (int64_t x = 0; x < ns; ++x) s[x] = exp_neg(s[x] - mm[x]);   // probabilities, vectorized
        for (int64_t t = 0; t < cnt; ++t)              // the softmax denominators
          for (int64_t h = 0; h < H; ++h) l[h] += s[t * H + h];
        if (fixed_values) fixed_values(vb, tok_stride, cnt, s.data(), H, G, acc.data());
        else for (int64_t t = 0; t < cnt; ++t) {       // add the block's values
          const float* vt = vb + t * tok_stride;
          for (int64_t h = 0; h < H; ++h) {
            const float p = s[t * H + h];
            const float* vh = vt + (h / G) * D;
            float* ah = acc.data() + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
          }
        }
      }
      float* ob = op + (b * Hq + g0 * G) * D;
      for (int64_t h = 0; h < H; ++h) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int64_t d = 0; d < D; ++d) ob[h * D + d] = acc[h * D + d] * inv;
      }
    }
  });
  return c.out;
}

// ---- prefill: causal attention of the last T positions of a context, K/V contiguous per kv head
//
// torch's fused CPU attention runs its block products through the BLAS it was built with; on a
// CPU where that BLAS takes a generic path (MKL on AMD) it reached 60-80 GFLOP/s where the same
// FMA units do ~200. This kernel keeps the whole block loop in vector registers instead: a tile
// of RT query rows (the G heads of a kv group at consecutive positions, scaled) against a block
// of 64 keys, scores from K transposed once per kv head ([D, ctx]), an online softmax per row,
// and the block's values added into the rows' outputs. 16-wide vectors (AVX-512 where the CPU
// has it, pairs of 8 elsewhere).
""" + V16_CPP + r"""
typedef int32_t i16v __attribute__((vector_size(64)));
static inline float hmax16(v16 v) {           // max over lanes, a 4-step tree
  v16 w = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > w ? v : w;
  w = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v > w ? v : w;
  w = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = v > w ? v : w;
  w = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  v = v > w ? v : w;
  return v[0];
}
// exp_neg on 16 lanes (same arithmetic as the scalar one above)
static inline v16 exp_neg16(v16 x) {
  const v16 lo = splat16(-87.0f);
  x = x < lo ? lo : x;
  const v16 big = splat16(12582912.0f);
  const v16 n = (x * 1.44269504088896341f + big) - big;
  const v16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  const v16 p = exp_taylor6(r);
  i16v bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += __builtin_convertvector(n, i16v) << 23;
  v16 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

constexpr int KB = 64;          // keys per block: 4 vectors of scores per row
constexpr float NEG = -1e30f;   // a masked score (finite: no inf - inf)

// One tile of RT query rows against one block of 64 keys (k0 .. k0+63; Kt [D, ctx_pad], V [ctx, D]):
// qt[RT][D] the scaled queries, lim[RT] each row's last visible key, rows of them real; the
// running max m, sum l and output o[RT][D] of each row are updated in place (they live in L1
// across the block loop, so that several tiles can share a block while it is in cache).
template <int NV, int RT>
static void tile_block(const float* qt, const int64_t* lim, int64_t rows, const float* kt, int64_t ctx_pad,
                       const float* vg, int64_t k0, int64_t kend, float* m, float* l, float* o) {
  constexpr int D = NV * 16;
  alignas(64) float P[RT][KB];
  v16 s[RT][4];
  for (int r = 0; r < RT; ++r) for (int c = 0; c < 4; ++c) s[r][c] = v16{};
  const float* kb = kt + k0;
  for (int d = 0; d < D; ++d) {
    const float* kd = kb + d * ctx_pad;
    const v16 k0v = load16(kd), k1v = load16(kd + 16), k2v = load16(kd + 32), k3v = load16(kd + 48);
    for (int r = 0; r < RT; ++r) {
      const float qv = qt[r * D + d];
      s[r][0] += qv * k0v; s[r][1] += qv * k1v; s[r][2] += qv * k2v; s[r][3] += qv * k3v;
    }
  }
  const bool edge = k0 + KB - 1 > lim[0];     // some key of the block is past some row's limit
  v16 lane;
  for (int i = 0; i < 16; ++i) lane[i] = static_cast<float>(i);
  float corr[RT];
  for (int r = 0; r < RT; ++r) {
    if (r >= rows) {
      corr[r] = 1.0f;
      for (int c = 0; c < 4; ++c) store16(&P[r][16 * c], v16{});
      continue;
    }
    if (edge) {
      const float rel = static_cast<float>(lim[r] - k0);
      for (int c = 0; c < 4; ++c) {
        const v16 idx = lane + static_cast<float>(16 * c);
        s[r][c] = idx > rel ? splat16(NEG) : s[r][c];
      }
    }
    v16 mx = s[r][0];
    for (int c = 1; c < 4; ++c) mx = mx > s[r][c] ? mx : s[r][c];
    const float mnew = std::max(m[r], hmax16(mx));
    corr[r] = exp_neg(m[r] - mnew);
    m[r] = mnew;
    v16 sum = v16{};
    for (int c = 0; c < 4; ++c) {
      v16 pv = exp_neg16(s[r][c] - mnew);
      pv = s[r][c] <= splat16(0.5f * NEG) ? v16{} : pv;
      sum += pv;
      store16(&P[r][16 * c], pv);
    }
    l[r] = l[r] * corr[r] + hsum16(sum);
  }
  v16 acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = load16(o + r * D + 16 * c) * corr[r];
  const int64_t cnt = std::min<int64_t>(KB, kend - k0);
  const float* vb = vg + k0 * D;
  for (int64_t j = 0; j < cnt; ++j) {
    v16 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load16(vb + j * D + 16 * c);
    for (int r = 0; r < RT; ++r) {
      const float pr = P[r][j];
      for (int c = 0; c < NV; ++c) acc[r][c] += pr * vv[c];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < NV; ++c) store16(o + r * D + 16 * c, acc[r][c]);
}

typedef void (*tile_fn)(const float*, const int64_t*, int64_t, const float*, int64_t, const float*,
                        int64_t, int64_t, float*, float*, float*);

template <int NV> static tile_fn pick_tile(int64_t D, int* rt) {
  if constexpr (NV > 0) {
    if (D == NV * 16) {
      constexpr int RT = NV <= 4 ? 6 : (NV <= 8 ? 2 : 1);   // RT * NV output vectors stay in registers
      *rt = RT;
      return tile_block<NV, RT>;
    }
    return pick_tile<NV - 1>(D, rt);
  } else {
    return nullptr;
  }
}

bool prefill_supported(int64_t D) { int rt; return pick_tile<16>(D, &rt) != nullptr; }

// q [Hq, T, D], k/v [Hkv, ctx, D], all fp32 contiguous; the queries are positions ctx-T .. ctx-1.
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  NoGil no_gil;
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "prefill_attention: fp32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "prefill_attention: contiguous only");
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(0), ctx = k.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k.size(2) == D && v.sizes() == k.sizes() && T <= ctx && T > 0,
              "prefill_attention: shapes do not agree");
  int RT = 0;
  tile_fn tile = pick_tile<16>(D, &RT);
  TORCH_CHECK(tile != nullptr, "prefill_attention: head size must be a multiple of 16 up to 256");
  const int64_t G = Hq / Hkv, prefix = ctx - T, rows = T * G, tiles = (rows + RT - 1) / RT;
  constexpr int64_t TG = 4;                      // tiles that share each key block while it is in L1
  const int64_t groups = (tiles + TG - 1) / TG;
  const int64_t ctx_pad = (ctx + KB - 1) / KB * KB;
  // K transposed per kv head, zero-padded to whole blocks: [Hkv, D, ctx_pad]
  auto kt = torch::zeros({Hkv, D, ctx_pad}, k.options());
  kt.narrow(2, 0, ctx).copy_(k.transpose(1, 2));
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* ktp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // a work item: TG tiles of one kv head, rows in (position, head of the group) order, so that a
  // tile's limits rise with its rows and the G heads of one position share theirs
  at::parallel_for(0, Hkv * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t W = TG * RT;
    std::vector<float> qt(W * D), o(W * D), m(W), l(W);
    std::vector<int64_t> lim(W), nrows(TG);
    std::vector<float*> orow(W);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = it / groups, t0 = (it % groups) * TG, nt = std::min(TG, tiles - t0);
      int64_t kend = 0;
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t r0 = (t0 + t) * RT, n = std::min<int64_t>(RT, rows - r0);
        nrows[t] = n;
        for (int64_t r = 0; r < RT; ++r) {
          const int64_t row = r0 + std::min<int64_t>(r, n - 1);    // padding rows repeat the last
          const int64_t pos = row / G, h = g * G + row % G, w = t * RT + r;
          const float* src = qp + (h * T + pos) * D;
          for (int64_t d = 0; d < D; ++d) qt[w * D + d] = src[d] * sc;
          lim[w] = prefix + pos;
          orow[w] = op + (h * T + pos) * D;
          m[w] = NEG; l[w] = 0.0f;
        }
        kend = std::max(kend, lim[t * RT + n - 1] + 1);
      }
      std::fill(o.begin(), o.end(), 0.0f);
      const float* ktg = ktp + g * D * ctx_pad;
      const float* vg = vp + g * ctx * D;
      for (int64_t k0 = 0; k0 < kend; k0 += KB)
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t w = t * RT;
          const int64_t tend = lim[w + nrows[t] - 1] + 1;          // this tile's last key + 1
          if (k0 >= tend) continue;
          tile(qt.data() + w * D, lim.data() + w, nrows[t], ktg, ctx_pad, vg, k0, tend,
               m.data() + w, l.data() + w, o.data() + w * D);
        }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t r = 0; r < nrows[t]; ++r) {
          const int64_t w = t * RT + r;
          const float inv = l[w] > 0.0f ? 1.0f / l[w] : 0.0f;
          for (int64_t d = 0; d < D; ++d) orow[w][d] = o[w * D + d] * inv;
        }
    }
  });
  return out;
}
// ---- decode, 16 lanes: head sizes that are a multiple of 16 up to 256
//
// The 8-lane path above scores one (token, head) pair at a time and sums each dot product
// across its vector on the spot; at one thread it read a cache in memory at ~6.5 GB/s, a
// quarter of what a plain sum reads. Here a head's 16 scores of a 16-token chunk are one
// vector: each token's dot product is left as a 16-lane partial, the 16 partials are
// summed across lanes by a shuffle tree (15 pair sums, not 16 separate reductions), the
// online softmax runs on that vector (the chunk's max, exp on 16 lanes at once), and the
// values are added with the head's output accumulators in registers. A work item is a
// sequence's kv heads, as above, so a block is used whole while it is in cache.
static inline v16 pair_sum16(v16 a, v16 b) {   // [a0+a1, a2+a3, ..., a14+a15, b0+b1, ..., b14+b15]
  const v16 ev = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const v16 od = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return ev + od;
}

// lane t = the sum of row t's 16 lanes, for 16 rows of 16 floats
static inline v16 row_sums16(const float* rows) {
  v16 r[8];
  for (int i = 0; i < 8; ++i) r[i] = pair_sum16(load16(rows + 32 * i), load16(rows + 32 * i + 16));
  for (int i = 0; i < 4; ++i) r[i] = pair_sum16(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 2; ++i) r[i] = pair_sum16(r[2 * i], r[2 * i + 1]);
  return pair_sum16(r[0], r[1]);
}

#ifndef SEG_KB
#define SEG_KB 256
#endif
// A decode work item's segment: whole blocks whose K and V add up to about SEG_KB (at least one block)
static inline int64_t segment_blocks(int64_t BS, int64_t row_floats) {
  return std::max<int64_t>(1, (SEG_KB << 10) / (2 * 4 * row_floats * BS));
}
static inline float hsum16t(v16 v) {           // sum over lanes, a 4-step tree
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// A sequence's context in segments of whole blocks whose K and V take about SEG_KB (so that
// they stay in L2), each in three passes with no dependency between tokens inside a pass:
// (0) the segment's K and V rows read with nothing else to do, so that the core keeps many
// cache misses in flight (measured on an AMD EPYC box: a read interleaved with the scoring
// arithmetic ran at half a plain read's rate, and software prefetch did not close the gap);
// (1) every head's scores of the segment into a buffer (per 16-token chunk and kv head, the G
// heads' dot products left as 16-lane partials and summed across lanes by one shuffle tree
// per head), then each head's segment max, the running output rescaled once, the
// probabilities; (2) the values added, the chunk's G heads' accumulators in registers. The
// online softmax's max -> exp -> rescale chain runs once per segment, not per 16 tokens.
template <int NV, int G>
static void decode_item16(const float* qb, float sc, int64_t Hkv_item, int64_t n, const int32_t* table,
                          const float* kp, const float* vp, int64_t BS, int64_t tok_stride, int64_t blk_stride,
                          float* acc, float* m, float* l, float* part, float* ob) {
  constexpr int D = NV * 16;
  const int64_t H = Hkv_item * G;
  const int64_t seg_blocks = segment_blocks(BS, Hkv_item * D);
  const int64_t seg_pad = seg_blocks * BS + 16;   // a head's row of scores in the buffer
  const int64_t nblocks = (n + BS - 1) / BS;
  const i16v iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t h = 0; h < H; ++h) { m[h] = -std::numeric_limits<float>::infinity(); l[h] = 0.0f; }
  std::fill(acc, acc + H * D, 0.0f);
  float* S = part + G * 256;                      // [H][seg_pad] scores, then probabilities
  // body(rows of kv head g at a 16-token chunk, g, tokens in the chunk, chunk's offset in the
  // segment) over the segment's chunks of K or V (cache base kv), block by block
  auto each_chunk = [&](const float* kv, int64_t b0, int64_t nb, int64_t s0, auto&& body) {
    for (int64_t bi = 0; bi < nb; ++bi) {
      const float* blk = kv + table[b0 + bi] * blk_stride;
      const int64_t in_blk = std::min(BS, n - s0 - bi * BS);
      for (int64_t c0 = 0; c0 < in_blk; c0 += 16)
        for (int64_t g = 0; g < Hkv_item; ++g)
          body(blk + c0 * tok_stride + g * D, g, (int)std::min<int64_t>(16, in_blk - c0), bi * BS + c0);
    }
  };
  for (int64_t b0 = 0; b0 < nblocks; b0 += seg_blocks) {
    const int64_t nb = std::min(seg_blocks, nblocks - b0);
    const int64_t s0 = b0 * BS, sn = std::min(n, (b0 + nb) * BS) - s0;   // the segment's tokens
    {                                             // (0) the segment's rows, read ahead
      v16 z = v16{};
      for (int64_t bi = 0; bi < nb; ++bi) {
        const float* kb = kp + table[b0 + bi] * blk_stride;
        const float* vb = vp + table[b0 + bi] * blk_stride;
        const int64_t in_blk = std::min(BS, n - s0 - bi * BS);
        for (int64_t t = 0; t < in_blk; ++t)
          for (int64_t x = 0; x < Hkv_item * D; x += 16) z += load16(kb + t * tok_stride + x) + load16(vb + t * tok_stride + x);
      }
      asm volatile("" : : "r"(&z) : "memory");    // keep the loads: nothing else reads z
    }
    // (1) scores
    each_chunk(kp, b0, nb, s0, [&](const float* kh, int64_t g, int cnt, int64_t off) {
      const float* qg = qb + g * G * D;
      v16 q[G][NV];
      for (int j = 0; j < G; ++j)
        for (int i = 0; i < NV; ++i) q[j][i] = load16(qg + j * D + 16 * i) * sc;
      for (int t = 0; t < cnt; ++t) {
        v16 k[NV];
        for (int i = 0; i < NV; ++i) k[i] = load16(kh + t * tok_stride + 16 * i);
        for (int j = 0; j < G; ++j) {
          v16 a = q[j][0] * k[0];
          for (int i = 1; i < NV; ++i) a += q[j][i] * k[i];
          store16(part + j * 256 + 16 * t, a);
        }
      }
      for (int j = 0; j < G; ++j) {
        for (int t = cnt; t < 16; ++t) store16(part + j * 256 + 16 * t, v16{});
        store16(S + (g * G + j) * seg_pad + off, row_sums16(part + j * 256));
      }
    });
    // the segment's softmax: new running max, rescale, probabilities and their sums
    const int64_t full = sn & ~int64_t(15);
    for (int64_t h = 0; h < H; ++h) {
      float* sh = S + h * seg_pad;
      v16 mv = splat16(NEG);
      for (int64_t x = 0; x < full; x += 16) { const v16 v = load16(sh + x); mv = v > mv ? v : mv; }
      if (full < sn) { const v16 v = load16(sh + full); mv = (iota < (int)(sn - full)) & (v > mv) ? v : mv; }
      const float mx = std::max(m[h], hmax16(mv));
      const float corr = std::isinf(m[h]) ? 0.0f : exp_neg(m[h] - mx);
      v16 lv = v16{};
      for (int64_t x = 0; x < full; x += 16) {
        const v16 p = exp_neg16(load16(sh + x) - mx);
        store16(sh + x, p);
        lv += p;
      }
      if (full < sn) {
        v16 p = exp_neg16(load16(sh + full) - mx);
        p = iota < (int)(sn - full) ? p : v16{};
        store16(sh + full, p);
        lv += p;
      }
      l[h] = l[h] * corr + hsum16t(lv);
      m[h] = mx;
      if (corr != 1.0f) for (int64_t d = 0; d < D; ++d) acc[h * D + d] *= corr;
    }
    // (2) values
    each_chunk(vp, b0, nb, s0, [&](const float* vh, int64_t g, int cnt, int64_t off) {
      const float* pg = S + g * G * seg_pad + off;
      v16 o[G][NV];
      float* ag = acc + g * G * D;
      for (int j = 0; j < G; ++j)
        for (int i = 0; i < NV; ++i) o[j][i] = load16(ag + j * D + 16 * i);
      for (int t = 0; t < cnt; ++t) {
        v16 v[NV];
        for (int i = 0; i < NV; ++i) v[i] = load16(vh + t * tok_stride + 16 * i);
        for (int j = 0; j < G; ++j) {
          const v16 pt = splat16(pg[j * seg_pad + t]);
          for (int i = 0; i < NV; ++i) o[j][i] += pt * v[i];
        }
      }
      for (int j = 0; j < G; ++j)
        for (int i = 0; i < NV; ++i) store16(ag + j * D + 16 * i, o[j][i]);
    });
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    for (int64_t d = 0; d < D; ++d) ob[h * D + d] = acc[h * D + d] * inv;
  }
}

typedef void (*item16_fn)(const float*, float, int64_t, int64_t, const int32_t*, const float*,
                          const float*, int64_t, int64_t, int64_t, float*, float*, float*, float*, float*);

constexpr int MAX_G16 = 8;   // query heads per kv head the 16-lane path takes

template <int NV, int G> static item16_fn pick_group16(int64_t g) {
  if constexpr (G > 0) {
    if (g == G) return decode_item16<NV, G>;
    return pick_group16<NV, G - 1>(g);
  }
  return nullptr;
}

template <int NV> static item16_fn pick_item16(int64_t D, int64_t G) {
  if constexpr (NV > 0) {
    if (D == NV * 16) return pick_group16<NV, MAX_G16>(G);
    return pick_item16<NV - 1>(D, G);
  }
  return nullptr;
}

bool decode16_supported(int64_t D, int64_t G) { return pick_item16<16>(D, G) != nullptr; }

// same contract as paged_decode; head size a multiple of 16 up to 256
torch::Tensor paged_decode16(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  NoGil no_gil;
  const DecodeSetup c = decode_setup(q, k_cache, v_cache, block_tables, context_lens, scale);
  const item16_fn item = pick_item16<16>(c.D, c.G);
  TORCH_CHECK(item != nullptr, "paged_decode16: head size ", c.D, " with ", c.G, " query heads per kv head (a ",
              "multiple of 16 up to 256, and up to ", MAX_G16, ")");
  int64_t parts, per;
  decode_parts(c, &parts, &per);
  at::parallel_for(0, c.B * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(c.Hq * c.D), m(c.Hq), l(c.Hq),
        part(MAX_G16 * 256 + c.Hq * (segment_blocks(c.BS, c.D) * c.BS + 16));   // an item of one kv head has the longest segment
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / parts, g0 = (i % parts) * per, g1 = std::min(c.Hkv, g0 + per);
      if (g0 >= g1) continue;
      item(c.qp + (b * c.Hq + g0 * c.G) * c.D, c.sc, g1 - g0, c.cl[b], c.bt + b * c.bt_stride,
           c.kp + g0 * c.D, c.vp + g0 * c.D, c.BS, c.tok_stride, c.blk_stride, acc.data(), m.data(), l.data(),
           part.data(), c.op + (b * c.Hq + g0 * c.G) * c.D);
    }
  });
  return c.out;
}

// one decode entry for Python: the 16-lane path where it applies, else the 8-lane one
torch::Tensor paged_decode_any(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  const int64_t G = k_cache.dim() == 4 && k_cache.size(2) > 0 ? q.size(1) / k_cache.size(2) : 0;
  if (q.dim() == 3 && decode16_supported(q.size(2), G))
    return paged_decode16(q, k_cache, v_cache, block_tables, context_lens, scale);
  return paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale);
}
"""

_KERNEL = CppKernel("hybridserve_cpu_attention", _SOURCE,
                    ["paged_decode", "paged_decode16", "paged_decode_any", "decode16_supported", "prefill_attention",
                     "prefill_supported"], "CPU attention kernel")


def _load():
    return _KERNEL.module()


def available() -> bool:
    """Whether the kernel is built (building it now if it was not tried yet)."""
    return _KERNEL.available()


def why_unavailable() -> str | None:
    return _KERNEL.why_unavailable()


def paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, scale):
    """The C++ kernel, same contract as `paged_attention_decode_ref` (fp32 caches)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the CPU attention kernel is unavailable ({why_unavailable()})")
    return mod.paged_decode_any(q.contiguous(), k_cache, v_cache, block_tables.to(torch.int32),
                                context_lens.to(torch.int32), float(scale))


def prefill_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last T positions of a context: q [Hq, T, D], k/v [Hkv, ctx, D]
    (fp32, contiguous; Hq a multiple of Hkv) -> [Hq, T, D]. The C++ kernel's prefill entry."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the CPU attention kernel is unavailable ({why_unavailable()})")
    return mod.prefill_attention(q, k, v, float(scale))


def prefill_usable(q: torch.Tensor) -> bool:
    """Whether a prefill call on these queries ([..., head size]) goes to the C++ kernel: CPU,
    fp32, HYBRIDSERVE_CPU_PREFILL_ATTENTION not 0, and a head size the kernel takes (its own
    `prefill_supported`: a multiple of 16 up to 256)."""
    if (q.is_cuda or q.dtype != torch.float32 or not available()
            or os.environ.get("HYBRIDSERVE_CPU_PREFILL_ATTENTION", "1") == "0"):
        return False
    return _load().prefill_supported(q.shape[-1])


def usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a decode call on these tensors goes to the C++ kernel."""
    return (not q.is_cuda and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and k_cache.is_contiguous() and available())
