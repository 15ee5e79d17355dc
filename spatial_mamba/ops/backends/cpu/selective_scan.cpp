// CPU forward and backward of the hidden-state selective scan with d_state N = 1 (the paper's eq. for x_t; the
// official kernels/selective_scan), float32:
//
//   dt_t = softplus(delta_t + bias_d)  (delta_t + bias_d without softplus)
//   x_t  = exp(dt_t A_d) x_{t-1} + dt_t B_{b,t} u_t,  x_{-1} = 0
//
// for every row (b, d) of u, delta (Bt, Dn, L); the forward returns every x_t (hs) and dt, which the backward reuses. The
// softplus is the official one: log1p(exp(v)) for v <= 20, v above, computed as max(v, 0) + log1p(exp(-|v|)).
//
// Plain C++ over raw pointers (no torch headers), compiled with g++ -O3 -march=native -fopenmp with
// state_fusion.cpp into one library (spatial_mamba/ops/backends/cpu/__init__.py).
//
// A task is a group of kRows rows. First, along each row, in vectors of VW positions: dt (written out),
// a_t - 1 = exp(dt_t A_d) - 1 into a scratch row, and b_t = dt_t B_t u_t into hs. Then the recurrence, sequential
// along t, as x_t = x_{t-1} + ((a_t - 1) x_{t-1} + b_t) (see vexp_core), runs over the kRows rows at once, so that
// their multiply-adds overlap.
// exp and log1p are evaluated with polynomials in vector registers (libm's scalar calls would dominate the time).
// The backward (sm_scan_backward) runs the adjoint recurrence backwards along the rows the same way.
// sm_scan_forward_tokens and sm_scan_backward_tokens take the token-major layout (batch, length, channels) instead
// (see "Token-major layout" below).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

constexpr int VW = kLanes;
constexpr int kRows = 8;

typedef float V __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(VW * sizeof(int32_t))));

inline V splat(float x) { return V{} + x; }

// NaN in a stays NaN.
inline V vmax(V a, V b) { return b > a ? b : a; }
inline V vmin(V a, V b) { return b < a ? b : a; }

// exp(x) - 1 (`minus_one`) or exp(x): x = n ln2 + r with |r| <= ln2 / 2; e^r - 1 = r q(r) with q the Taylor
// polynomial of degree 6 of (e^r - 1) / r (relative error below 2e-8), and e^x - 1 = 2^n (e^r - 1) + (2^n - 1), 2^n
// built in the exponent bits. exp(x) - 1 keeps its relative accuracy for tiny x: the scan's decays exp(Δ A) lie
// within 1e-6 of 1 for slow channels, where exp itself, rounded to float32, would be off by up to 3% of 1 - exp and
// the error would compound over the row. Below -87.3 (where float32 goes subnormal) exp(x) is 0.
inline V vexp_core(V x, bool minus_one) {
  x = vmin(x, splat(88.37f));
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693145751953125f;  // ln2 split in two for an exact product with n
  r = r - n * 1.428606765330187045e-06f;
  V q = splat(1.0f / 5040);
  q = q * r + 1.0f / 720;
  q = q * r + 1.0f / 120;
  q = q * r + 1.0f / 24;
  q = q * r + 1.0f / 6;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  const V em1 = r * q;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const V value = minus_one ? scale * em1 + (scale - 1.0f) : scale * em1 + scale;
  return x < -87.3f ? splat(minus_one ? -1.0f : 0.0f) : value;
}

inline V vexp(V x) { return vexp_core(x, false); }
inline V vexpm1(V x) { return vexp_core(x, true); }

// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, by its odd series to s^17 (the first omitted
// term is below 5e-11 of the sum).
inline V vlog1p_unit(V e) {
  const V s = e / (e + 2.0f);
  const V s2 = s * s;
  V p = splat(1.0f / 17);
  p = p * s2 + 1.0f / 15;
  p = p * s2 + 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

inline V vsoftplus(V v) {
  const V abs_v = v < 0.0f ? -v : v;
  const V soft = vmax(v, V{}) + vlog1p_unit(vexp(-abs_v));
  return v > 20.0f ? v : soft;
}

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// dt, a - 1 = exp(dt A) - 1 and b = dt B u of one row, positions [t, t + n) with n <= VW.
inline void row_terms(const float* u, const float* delta, const float* Bt, float bias, float A, bool softplus, int64_t t,
                      int64_t n, float* dt, float* a, float* b) {
  V vdt = load_n<V>(delta + t, n) + bias;
  if (softplus) vdt = vsoftplus(vdt);
  store_n(dt + t, vdt, n);
  store_n(a + t, vexpm1(vdt * A), n);
  store_n(b + t, vdt * load_n<V>(Bt + t, n) * load_n<V>(u + t, n), n);
}

// The parameter gradients of an empty scan: zeros.
inline void zero_parameter_grads(float* dA, float* dbias, float* dB, int64_t batch, int64_t channels, int64_t length) {
  if (dA) std::memset(dA, 0, channels * sizeof(float));
  if (dbias) std::memset(dbias, 0, channels * sizeof(float));
  if (dB) std::memset(dB, 0, batch * length * sizeof(float));
}

// The last step of both backward layouts, called inside their parallel region (its loops are shared among the
// region's threads): dA and d bias summed over the batch from the per-(batch, channel) row_sums [dA, d bias], and dB
// summed over each batch element's `parts` per-task partials of dB_partial (batch, parts, length), in a fixed order.
inline void sum_parameter_grads(const std::vector<double>& row_sums, const std::vector<float>& dB_partial,
                                int64_t parts, int64_t batch, int64_t channels, int64_t length, float* dA,
                                float* dbias, float* dB) {
#pragma omp for schedule(static)
  for (int64_t d = 0; d < channels; ++d) {
    double total_dA = 0.0, total_dbias = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      total_dA += row_sums[(b * channels + d) * 2];
      total_dbias += row_sums[(b * channels + d) * 2 + 1];
    }
    if (dA) dA[d] = static_cast<float>(total_dA);
    if (dbias) dbias[d] = static_cast<float>(total_dbias);
  }
  if (dB) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      float* dst = dB + b * length;
      std::memcpy(dst, dB_partial.data() + b * parts * length, length * sizeof(float));
      for (int64_t part = 1; part < parts; ++part) {
        const float* src = dB_partial.data() + (b * parts + part) * length;
        for (int64_t t = 0; t < length; ++t) dst[t] += src[t];
      }
    }
  }
}

}  // namespace

extern "C" {

// u, delta, hs, dt: (batch, channels, length) contiguous float32; A (channels,); B (batch, length); bias (channels,)
// or null. hs receives x_t, dt receives dt_t.
void sm_scan_forward(const float* u, const float* delta, const float* A, const float* B, const float* bias,
                     int softplus, float* hs, float* dt, int64_t batch, int64_t channels, int64_t length,
                     int threads) {
  const int64_t rows = batch * channels, tasks = (rows + kRows - 1) / kRows;
  if (rows == 0 || length == 0) return;
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<float> decay(kRows * length);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t first = task * kRows, count = std::min<int64_t>(kRows, rows - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = first + i, b = row / channels, d = row % channels;
        const int64_t offset = row * length;
        for (int64_t t = 0; t < length; t += VW) {
          row_terms(u + offset, delta + offset, B + b * length, bias ? bias[d] : 0.0f, A[d], softplus != 0, t,
                    std::min<int64_t>(VW, length - t), dt + offset, decay.data() + i * length, hs + offset);
        }
      }
      // x_t = x_{t-1} + ((a_t - 1) x_{t-1} + b_t), kRows rows side by side.
      if (count == kRows) {
        float x[kRows] = {};
        float* h[kRows];
        const float* a[kRows];
        for (int i = 0; i < kRows; ++i) h[i] = hs + (first + i) * length, a[i] = decay.data() + i * length;
        for (int64_t t = 0; t < length; ++t) {
#pragma GCC unroll 8
          for (int i = 0; i < kRows; ++i) h[i][t] = x[i] = x[i] + (a[i][t] * x[i] + h[i][t]);
        }
      } else {
        for (int64_t i = 0; i < count; ++i) {
          float* h = hs + (first + i) * length;
          const float* a = decay.data() + i * length;
          float state = 0.0f;
          for (int64_t t = 0; t < length; ++t) h[t] = state = state + (a[t] * state + h[t]);
        }
      }
    }
  }
}

// Gradients of sm_scan_forward's hs for the upstream gradient dhs (batch, channels, length), from the forward's hs
// and dt. With a_t = exp(dt_t A) and g_t = dL/dx_t = dhs_t + a_{t+1} g_{t+1} (run as g_{t+1} + ((a_{t+1} - 1)
// g_{t+1} + dhs_t)), and q_t = a_t g_t x_{t-1} (x_{-1} = 0):
//   d dt_t = g_t B_t u_t + q_t A,  du_t = g_t dt_t B_t,  dA = sum q_t dt_t,  dB_{b,t} = sum over d of g_t dt_t u_t,
//   d delta_t = d dt_t sigmoid(v_t) with v_t = delta_t + bias (d dt_t for v_t > 20, or without softplus),
//   d bias = sum of d delta_t.
// Each output pointer may be null (not asked for). A task is kRows channels of one batch element; the sums over
// batch (dA, d bias) and over channels (dB) are added from per-task partials in a fixed order.
void sm_scan_backward(const float* u, const float* delta, const float* A, const float* B, const float* bias,
                      int softplus, const float* hs, const float* dt, const float* dhs, float* du, float* ddelta,
                      float* dA, float* dB, float* dbias, int64_t batch, int64_t channels, int64_t length,
                      int threads) {
  const int64_t groups = (channels + kRows - 1) / kRows, tasks = batch * groups;
  if (batch * channels == 0 || length == 0) return zero_parameter_grads(dA, dbias, dB, batch, channels, length);
  std::vector<double> row_sums(batch * channels * 2, 0.0);  // per row: dA, d bias
  std::vector<float> dB_partial(dB ? tasks * length : 0, 0.0f);
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<float> em1(kRows * length), g(kRows * length);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / groups, d0 = task % groups * kRows;
      const int64_t count = std::min<int64_t>(kRows, channels - d0);
      const float* Bt = B + b * length;
      // a_t - 1 per row.
      for (int64_t i = 0; i < count; ++i) {
        const int64_t offset = (b * channels + d0 + i) * length;
        for (int64_t t = 0; t < length; t += VW) {
          const int64_t n = std::min<int64_t>(VW, length - t);
          V x = V{};
          if (n == VW) {
            x = load(dt + offset + t);
          } else {
            for (int64_t j = 0; j < n; ++j) x[j] = dt[offset + t + j];
          }
          const V e = vexpm1(x * A[d0 + i]);
          if (n == VW) {
            store(em1.data() + i * length + t, e);
          } else {
            for (int64_t j = 0; j < n; ++j) em1[i * length + t + j] = e[j];
          }
        }
      }
      // g_t backwards along the row, the rows side by side.
      for (int64_t i = 0; i < count; ++i) {
        const float* up = dhs + (b * channels + d0 + i) * length;
        const float* e = em1.data() + i * length;
        float* gi = g.data() + i * length;
        float next = 0.0f;
        gi[length - 1] = next = up[length - 1];
        for (int64_t t = length - 2; t >= 0; --t) gi[t] = next = next + (e[t + 1] * next + up[t]);
      }
      // The gradients, along each row in vectors.
      for (int64_t i = 0; i < count; ++i) {
        const int64_t d = d0 + i, row = b * channels + d, offset = row * length;
        const float a_param = A[d], bias_d = bias ? bias[d] : 0.0f;
        V sum_dA = V{}, sum_dbias = V{};
        for (int64_t t = 0; t < length; t += VW) {
          const int64_t n = std::min<int64_t>(VW, length - t);
          V vg = V{}, vdt = V{}, vu = V{}, vB = V{}, vprev = V{}, vdelta = V{};
          const int64_t p0 = offset + t;
          if (n == VW && t > 0) {
            vg = load(g.data() + i * length + t), vdt = load(dt + p0);
            vu = load(u + p0), vB = load(Bt + t), vdelta = load(delta + p0), vprev = load(hs + p0 - 1);
          } else {
            for (int64_t j = 0; j < n; ++j) {
              const int64_t p = p0 + j;
              vg[j] = g[i * length + t + j], vdt[j] = dt[p], vu[j] = u[p];
              vB[j] = Bt[t + j], vdelta[j] = delta[p], vprev[j] = t + j > 0 ? hs[p - 1] : 0.0f;
            }
          }
          // a_t itself, not 1 + (a_t - 1), which loses a_t's digits where it is far below 1.
          const V q = vexp(vdt * a_param) * vg * vprev;
          V ddt = vg * vB * vu + q * a_param;
          sum_dA += q * vdt;
          if (softplus) {
            const V v = vdelta + bias_d;
            const V sig = 1.0f / (vexp(-v) + 1.0f);
            ddt = v > 20.0f ? ddt : ddt * sig;
          }
          sum_dbias += ddt;  // lanes past the row's end hold zeros
          const V vdu = vg * vdt * vB, vdB = vg * vdt * vu;
          float* dB_row = dB ? dB_partial.data() + task * length + t : nullptr;
          if (n == VW) {
            if (du) store(du + p0, vdu);
            if (ddelta) store(ddelta + p0, ddt);
            if (dB_row) store(dB_row, i == 0 ? vdB : load(dB_row) + vdB);
          } else {
            for (int64_t j = 0; j < n; ++j) {
              if (du) du[p0 + j] = vdu[j];
              if (ddelta) ddelta[p0 + j] = ddt[j];
              if (dB_row) dB_row[j] = (i == 0 ? 0.0f : dB_row[j]) + vdB[j];
            }
          }
        }
        double total_dA = 0.0, total_dbias = 0.0;
        for (int j = 0; j < VW; ++j) total_dA += sum_dA[j], total_dbias += sum_dbias[j];
        row_sums[row * 2] = total_dA, row_sums[row * 2 + 1] = total_dbias;
      }
    }
    sum_parameter_grads(row_sums, dB_partial, groups, batch, channels, length, dA, dbias, dB);
  }
}

// ---- Token-major layout ---------------------------------------------------------------------------------------------
// The same scan with u, delta, hs, dt, dhs, du and d delta (batch, length, channels), channels innermost: the layout
// of the blocks' (B, h, w, C) tokens, so that the mixer needs no transposed copy on either side of the scan. The
// channels lie in the vector lanes: a task is a block of kBlockVecs * VW channels of one batch element, walked along
// t, each step reading a contiguous run of each tensor. Only x_t depends on the step before; the exp and softplus of
// successive steps overlap.

constexpr int kBlockVecs = 4;
constexpr int64_t kBlockChannels = kBlockVecs * VW;

// Channels per vector of a block starting at channel c0: VW, or fewer in the last vector.
inline int64_t lanes(int64_t channels, int64_t c0, int k) {
  return std::max<int64_t>(0, std::min<int64_t>(VW, channels - c0 - k * VW));
}

void sm_scan_forward_tokens(const float* u, const float* delta, const float* A, const float* B, const float* bias,
                            int softplus, float* hs, float* dt, int64_t batch, int64_t channels, int64_t length,
                            int threads) {
  const int64_t blocks = (channels + kBlockChannels - 1) / kBlockChannels, tasks = batch * blocks;
  if (batch * channels == 0 || length == 0) return;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (tasks > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / blocks, c0 = task % blocks * kBlockChannels;
    int64_t n[kBlockVecs];
    V vA[kBlockVecs], vbias[kBlockVecs], x[kBlockVecs];
    for (int k = 0; k < kBlockVecs; ++k) {
      n[k] = lanes(channels, c0, k);
      vA[k] = load_n<V>(A + c0 + k * VW, n[k]);
      vbias[k] = bias ? load_n<V>(bias + c0 + k * VW, n[k]) : V{};
      x[k] = V{};
    }
    for (int64_t t = 0; t < length; ++t) {
      const int64_t base = (b * length + t) * channels + c0;
      const float Bt = B[b * length + t];
#pragma GCC unroll 4
      for (int k = 0; k < kBlockVecs; ++k) {
        if (n[k] == 0) break;
        const int64_t p = base + k * VW;
        V vdt = load_n<V>(delta + p, n[k]) + vbias[k];
        if (softplus) vdt = vsoftplus(vdt);
        // x_t = x_{t-1} + ((a_t - 1) x_{t-1} + b_t), as in sm_scan_forward.
        x[k] = x[k] + (vexpm1(vdt * vA[k]) * x[k] + vdt * Bt * load_n<V>(u + p, n[k]));
        store_n(hs + p, x[k], n[k]);
        store_n(dt + p, vdt, n[k]);
      }
    }
  }
}

// Gradients of sm_scan_forward_tokens, as sm_scan_backward's: the adjoint recurrence runs backwards along t with the
// gradients of each step computed in the same pass. dB's sum over channels is a per-task partial (summed over the
// task's lanes), added over the tasks of a batch element in a fixed order; dA and d bias as in sm_scan_backward.
void sm_scan_backward_tokens(const float* u, const float* delta, const float* A, const float* B, const float* bias,
                             int softplus, const float* hs, const float* dt, const float* dhs, float* du,
                             float* ddelta, float* dA, float* dB, float* dbias, int64_t batch, int64_t channels,
                             int64_t length, int threads) {
  const int64_t blocks = (channels + kBlockChannels - 1) / kBlockChannels, tasks = batch * blocks;
  if (batch * channels == 0 || length == 0) return zero_parameter_grads(dA, dbias, dB, batch, channels, length);
  std::vector<double> row_sums(batch * channels * 2, 0.0);  // per (b, channel): dA, d bias
  std::vector<float> dB_partial(dB ? tasks * length : 0, 0.0f);
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, c0 = task % blocks * kBlockChannels;
      int64_t n[kBlockVecs];
      V vA[kBlockVecs], vbias[kBlockVecs], g[kBlockVecs], em1_next[kBlockVecs], sum_dA[kBlockVecs],
          sum_dbias[kBlockVecs];
      for (int k = 0; k < kBlockVecs; ++k) {
        n[k] = lanes(channels, c0, k);
        vA[k] = load_n<V>(A + c0 + k * VW, n[k]);
        vbias[k] = bias ? load_n<V>(bias + c0 + k * VW, n[k]) : V{};
        g[k] = em1_next[k] = sum_dA[k] = sum_dbias[k] = V{};
      }
      for (int64_t t = length - 1; t >= 0; --t) {
        const int64_t base = (b * length + t) * channels + c0;
        const float Bt = B[b * length + t];
        V acc_dB = V{};
#pragma GCC unroll 4
        for (int k = 0; k < kBlockVecs; ++k) {
          if (n[k] == 0) break;
          const int64_t p = base + k * VW;
          // g_t = g_{t+1} + ((a_{t+1} - 1) g_{t+1} + dhs_t).
          g[k] = g[k] + (em1_next[k] * g[k] + load_n<V>(dhs + p, n[k]));
          const V vdt = load_n<V>(dt + p, n[k]), vu = load_n<V>(u + p, n[k]);
          const V prev = t > 0 ? load_n<V>(hs + p - channels, n[k]) : V{};
          em1_next[k] = vexpm1(vdt * vA[k]);
          // a_t itself, not 1 + (a_t - 1), which loses a_t's digits where it is far below 1.
          const V q = vexp(vdt * vA[k]) * g[k] * prev;
          V ddt = g[k] * Bt * vu + q * vA[k];
          sum_dA[k] += q * vdt;
          if (softplus) {
            const V v = load_n<V>(delta + p, n[k]) + vbias[k];
            const V sig = 1.0f / (vexp(-v) + 1.0f);
            ddt = v > 20.0f ? ddt : ddt * sig;
          }
          sum_dbias[k] += ddt;  // lanes past the last channel hold zeros
          if (du) store_n(du + p, g[k] * vdt * Bt, n[k]);
          if (ddelta) store_n(ddelta + p, ddt, n[k]);
          acc_dB += g[k] * vdt * vu;
        }
        if (dB) {
          float total = 0.0f;
          for (int j = 0; j < VW; ++j) total += acc_dB[j];
          dB_partial[task * length + t] = total;
        }
      }
      for (int k = 0; k < kBlockVecs; ++k) {
        for (int64_t j = 0; j < n[k]; ++j) {
          const int64_t row = b * channels + c0 + k * VW + j;
          row_sums[row * 2] = sum_dA[k][j], row_sums[row * 2 + 1] = sum_dbias[k][j];
        }
      }
    }
    sum_parameter_grads(row_sums, dB_partial, blocks, batch, channels, length, dA, dbias, dB);
  }
}

}  // extern "C"
