// CPU kernels of the structure-aware state fusion (the paper's eq. for h_t; the official
// classification/models/spatialmamba.py, StateFusion) and of the fused observation y = fusion(h) * C + D * u:
//
//   F[b, c, y, x] = sum_k taps[c, k] * h[b, c, clamp(y + dy_k, 0, H - 1), clamp(x + dx_k, 0, W - 1)]
//
// over the 25 offsets of spatial_mamba/ops/state_fusion.py (FUSION_OFFSETS), float32 throughout.
//
// Plain C++ over raw pointers (no torch headers): spatial_mamba/ops/backends/cpu/__init__.py compiles this file with
// g++ -O3 -march=native -fopenmp, loads it with ctypes and passes the tensors' data pointers.
//
// Two layouts: the planes (B, C, H, W) contiguous (sm_fusion_forward, sm_fusion_backward), or token-major
// (B, H, W, C), channels innermost (the *_tokens entry points; see "Token-major layout" below).
//
// The work on contiguous planes: a task is a block of rows of one plane (forward) or of the planes of a group of channels of one
// batch element (backward). A task copies the rows it reads, with their halo, into a thread-local buffer of
// `stride` floats per row: replicate-padded h for the forward, zero-padded dF for the adjoint. Every pixel is then an
// interior pixel of the buffer: the 25 taps are summed over VW consecutive pixels in vector registers with no clamp,
// whatever the size of the plane (planes smaller than the halo included).
//
// The adjoint: the forward is a correlation of the replicate-padded plane, so dh is the correlation of zero-padded
// dF with the flipped taps over the plane and its 5-pixel halo, with each halo pixel's result then added onto the
// border pixel the padding copied there (`adjoint`; the halo rows are summed before the taps are applied): exact,
// and vectorised like the forward.
//
// Reductions (dtaps, dD over batch and plane; dC over channels) are deterministic: each task writes its own partial
// sums, added afterwards in a fixed order that depends on the shapes only, not on the number of threads.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

constexpr int kTaps = 25;
constexpr int kHalo = 5;
// The offsets of FUSION_OFFSETS: the centre, then for d = 1, 3, 5 the eight outer taps of the 3x3 kernel, row-major.
constexpr int kDy[kTaps] = {0, -1, -1, -1, 0, 0, 1, 1, 1, -3, -3, -3, 0, 0, 3, 3, 3, -5, -5, -5, 0, 0, 5, 5, 5};
constexpr int kDx[kTaps] = {0, -1, 0, 1, -1, 1, -1, 0, 1, -3, 0, 3, -3, 3, -3, 0, 3, -5, 0, 5, -5, 5, -5, 0, 5};
// dtaps and dD partial sums of one (batch element, row block, channel): 25 taps, then dD.
constexpr int kPartials = kTaps + 1;
// Channels per backward task: their dC partial sums share one buffer.
constexpr int64_t kChannelGroup = 16;
// A task's rows (with their halo) fill about this many floats of buffer.
constexpr int64_t kBufferFloats = 32768;

template <int VW>
struct Vec {
  typedef float type __attribute__((vector_size(VW * sizeof(float))));
};

template <int VW>
inline typename Vec<VW>::type load(const float* p) {
  typename Vec<VW>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int VW>
inline void store(float* p, typename Vec<VW>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

struct Geometry {
  int64_t height, width;
  int64_t stride;      // floats per buffer row, a multiple of 16 (room for every vector read, see `geometry`)
  int64_t block_rows;  // output rows per task
  int64_t blocks;      // row blocks per plane
};

// Buffers hold a task's rows with a halo of 5 (replicate-padded h) or 10 (zero-padded dF, whose adjoint is computed
// on the plane and its 5-pixel halo); rows are `stride` floats, enough for the widest vector read: the adjoint's
// round_up(width + 10, VW) outputs, each reading 5 columns either side.
template <int VW>
Geometry geometry(int64_t height, int64_t width) {
  Geometry g;
  g.height = height;
  g.width = width;
  g.stride = round_up(round_up(width + 2 * kHalo, VW) + 2 * kHalo, 16);
  g.block_rows = std::min(height, std::max<int64_t>(8, kBufferFloats / g.stride - 4 * kHalo));
  g.blocks = (height + g.block_rows - 1) / g.block_rows;
  return g;
}

// Tasks taken at a time by a thread: about 16 chunks per thread, so that a thread slowed down (by another process)
// hands its share to the others. The partial sums belong to tasks, not threads: the results do not depend on it.
inline int64_t chunk_size(int64_t tasks, int threads) { return std::max<int64_t>(1, tasks / (16 * threads)); }

inline int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Rows r0 - 5 .. r1 + 4 of `plane`, each clamped into the plane and padded with 5 copies of its end pixels; plane
// pixel (y, x) lands at buffer[(y - r0 + 5) * stride + x + 5]. Columns past width + 10 stay zero.
void pad_replicate(const float* plane, const Geometry& g, int64_t r0, int64_t r1, float* buffer) {
  const int64_t w = g.width;
  for (int64_t i = 0; i < r1 - r0 + 2 * kHalo; ++i) {
    const float* src = plane + clamp(r0 - kHalo + i, 0, g.height - 1) * w;
    float* dst = buffer + i * g.stride;
    for (int j = 0; j < kHalo; ++j) dst[j] = src[0];
    std::memcpy(dst + kHalo, src, w * sizeof(float));
    for (int j = 0; j < kHalo; ++j) dst[kHalo + w + j] = src[w - 1];
  }
}

// Rows r0 - 10 .. r1 + 9 of dF = dy (* C when C is given), zero outside the plane; pixel (y, x) lands at
// buffer[(y - r0 + 10) * stride + x + 10]. The columns outside [10, 10 + width) are zero from the buffer's allocation
// and never written.
void pad_zero(const float* dy, const float* obs, const Geometry& g, int64_t r0, int64_t r1, float* buffer) {
  const int64_t w = g.width;
  for (int64_t i = 0; i < r1 - r0 + 4 * kHalo; ++i) {
    const int64_t y = r0 - 2 * kHalo + i;
    float* dst = buffer + i * g.stride + 2 * kHalo;
    if (y < 0 || y >= g.height) {
      // With one block a plane, these rows hold no plane row in any task: zero since the buffer's allocation.
      if (g.blocks > 1) std::memset(dst, 0, w * sizeof(float));
    } else if (obs == nullptr) {
      std::memcpy(dst, dy + y * w, w * sizeof(float));
    } else {
      for (int64_t x = 0; x < w; ++x) dst[x] = dy[y * w + x] * obs[y * w + x];
    }
  }
}

// Rows summed together: independent accumulators hide the latency of the multiply-adds.
constexpr int kTileRows = 4;

// For the rows y0 .. y0 + RY - 1 of an output of `width` columns, whose pixel (y, x) is centred on
// centre[(y - y0) * stride + x], and for each vector of VW pixels at x0 (the last vector of a row overlaps the one
// before it when the width is not a multiple of VW), the sums over the 25 taps of
// taps[k] * centre[... + SIGN * (dy_k * stride + dx_k)]: the fusion (SIGN = 1, on replicate-padded h) or its
// zero-padded adjoint (SIGN = -1, on dF). They are handed to emit(y, x0, first, count, sums): the sums at indices
// first .. count - 1 are new (the others were handed over before, or lie past the row's end); the rows before
// y0 + skip_rows were handed over before too.
template <int VW, int SIGN, int RY, class Emit>
inline void tile_rows(const float* centre, int64_t stride, int64_t width, int64_t y0, int64_t skip_rows,
                      const float* taps, Emit& emit) {
  typedef typename Vec<VW>::type V;
  for (int64_t x = 0; x < width; x += VW) {
    const int64_t x0 = width >= VW ? std::min(x, width - VW) : 0;
    V acc[RY] = {};
#pragma GCC unroll 25
    for (int k = 0; k < kTaps; ++k) {
      const float t = taps[k];
      const float* src = centre + x0 + SIGN * (kDy[k] * stride + kDx[k]);
#pragma GCC unroll 4
      for (int r = 0; r < RY; ++r) acc[r] += t * load<VW>(src + r * stride);
    }
    for (int r = skip_rows; r < RY; ++r) emit(y0 + r, x0, x - x0, std::min<int64_t>(VW, width - x0), acc[r]);
  }
}

// tile_rows over the output rows y0 .. y1 - 1 (centred on origin[(y - y0) * stride + x]), kTileRows at a time (the
// last tile overlaps the one before it).
template <int VW, int SIGN, class Emit>
void sum_taps(const float* origin, int64_t stride, int64_t width, int64_t y0, int64_t y1, const float* taps,
              Emit emit) {
  if (y1 - y0 < kTileRows) {
    for (int64_t y = y0; y < y1; ++y) tile_rows<VW, SIGN, 1>(origin + (y - y0) * stride, stride, width, y, 0, taps, emit);
    return;
  }
  for (int64_t y = y0; y < y1; y += kTileRows) {
    const int64_t t0 = std::min(y, y1 - kTileRows);
    tile_rows<VW, SIGN, kTileRows>(origin + (t0 - y0) * stride, stride, width, t0, y - t0, taps, emit);
  }
}

// An emit that stores the sums at out[(y - y0) * stride + x].
template <int VW>
struct Store {
  float* out;
  int64_t y0, stride;
  inline void operator()(int64_t y, int64_t x0, int64_t, int64_t count, typename Vec<VW>::type v) {
    float* dst = out + (y - y0) * stride + x0;
    if (count == VW) {
      store<VW>(dst, v);
    } else {
      for (int64_t i = 0; i < count; ++i) dst[i] = v[i];
    }
  }
};

struct Inputs {
  const float* h;
  const float* taps;
  const float* obs;   // C (B, H, W), or null for the plain fusion
  const float* u;     // (B, C, H, W), with C
  const float* skip;  // D (C,), with C
  int64_t batch, channels, height, width;
};

template <int VW>
void forward(const Inputs& in, float* out, int threads) {
  typedef typename Vec<VW>::type V;
  const Geometry g = geometry<VW>(in.height, in.width);
  const int64_t w = g.width, plane_size = g.height * g.width;
  const int64_t tasks = in.batch * in.channels * g.blocks;
  const int64_t chunk = chunk_size(tasks, threads);
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<float> hb((g.block_rows + 2 * kHalo) * g.stride, 0.0f);
    const float* origin = hb.data() + kHalo * g.stride + kHalo;  // plane pixel (r0, 0)
#pragma omp for schedule(dynamic, chunk)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t plane = task / g.blocks, b = plane / in.channels, c = plane % in.channels;
      const int64_t r0 = task % g.blocks * g.block_rows, r1 = std::min(g.height, r0 + g.block_rows);
      const float* taps = in.taps + c * kTaps;
      pad_replicate(in.h + plane * plane_size, g, r0, r1, hb.data());
      float* dst = out + plane * plane_size;
      if (in.obs == nullptr) {
        sum_taps<VW, 1>(origin, g.stride, w, r0, r1, taps, Store<VW>{dst, 0, w});
        continue;
      }
      // y = F * C + D * u.
      const float* obs = in.obs + b * plane_size;
      const float* u = in.u + plane * plane_size;
      const float d = in.skip[c];
      sum_taps<VW, 1>(origin, g.stride, w, r0, r1, taps, [&](int64_t y, int64_t x0, int64_t, int64_t count, V v) {
        const int64_t p = y * w + x0;
        if (count == VW) {
          store<VW>(dst + p, v * load<VW>(obs + p) + d * load<VW>(u + p));
        } else {
          for (int64_t i = 0; i < count; ++i) dst[p + i] = v[i] * obs[p + i] + d * u[p + i];
        }
      });
    }
  }
}

// The dP of the halo rows above (below) the plane, summed over those rows, added onto `dst`, the dP row of the first
// (last) plane row: only the taps with dy_k < 0 (> 0) reach there, each with dF summed over the rows whose reads the
// clamp moved there, rows 0 .. -1 - dy_k (H - dy_k .. H - 1), at px - dx_k. `sums` is a scratch row.
void fold_halo_rows(const float* dfb, const Geometry& g, int64_t r0, const float* taps, bool above, float* sums,
                    float* dst) {
  const int64_t wp = g.width + 2 * kHalo;
  std::memset(sums, 0, g.stride * sizeof(float));
  for (int rows = 1; rows <= kHalo; ++rows) {
    const int64_t r = above ? rows - 1 : g.height - rows;  // rows outside the plane are zero in dfb
    const float* src = dfb + (r - r0 + 2 * kHalo) * g.stride;
    for (int64_t x = 0; x < g.stride; ++x) sums[x] += src[x];
    for (int k = 0; k < kTaps; ++k) {
      if ((above ? -kDy[k] : kDy[k]) != rows) continue;
      const float t = taps[k];
      const float* shifted = sums + kHalo - kDx[k];
      for (int64_t x = 0; x < wp; ++x) dst[x] += t * shifted[x];
    }
  }
}

// dh of one task's rows r0 .. r1 - 1, from zero-padded dF (`dfb`, see pad_zero), through `dp`, a buffer of
// block_rows x stride floats, and `sums`, one row.
//
// The forward reads the replicate-padded plane P (the plane and its 5-pixel halo): F = corr(P, taps). Its adjoint is
// dP = the correlation of zero-padded dF with the flipped taps, on the plane and its halo, followed by the adjoint
// of the padding: each halo pixel's dP is added onto the border pixel it copies. The halo rows' dP is only ever
// summed, so it is computed summed (`fold_halo_rows`); the halo columns' dP is computed with the plane's rows and
// added onto the first and last columns (a corner gathers its 6 x 6 block).
template <int VW>
void adjoint(const float* dfb, const Geometry& g, int64_t r0, int64_t r1, const float* taps, float* dp, float* sums,
             float* dh) {
  const int64_t w = g.width, wp = w + 2 * kHalo;
  // dP at (y, px), px = -5 .. w + 4, lands at dp[(y - r0) * stride + px + 5]; it is centred on dF at
  // dfb[(y - r0 + 10) * stride + px + 10].
  sum_taps<VW, -1>(dfb + 2 * kHalo * g.stride + kHalo, g.stride, wp, r0, r1, taps, Store<VW>{dp, r0, g.stride});
  auto row = [&](int64_t y) { return dp + (y - r0) * g.stride; };
  // Both onto row 0 when the plane has one row.
  if (r0 == 0) fold_halo_rows(dfb, g, r0, taps, true, sums, row(0));
  if (r1 == g.height) fold_halo_rows(dfb, g, r0, taps, false, sums, row(g.height - 1));
  // Halo columns onto the first and last columns, then the plane's pixels into dh.
  for (int64_t y = r0; y < r1; ++y) {
    float* src = row(y);
    float left = src[kHalo], right = w > 1 ? src[kHalo + w - 1] : 0.0f;
    for (int j = 0; j < kHalo; ++j) left += src[j];
    for (int j = 0; j < kHalo; ++j) right += src[2 * kHalo + w - 1 - j];
    std::memcpy(dh + y * w, src + kHalo, w * sizeof(float));
    dh[y * w] = w > 1 ? left : left + right;
    if (w > 1) dh[y * w + w - 1] = right;
  }
}

struct Grads {
  const float* dy;
  float* dh;     // each null when not asked for
  float* dtaps;  // (C, 25)
  float* dobs;   // dC (B, H, W)
  float* du;
  float* dskip;  // dD (C,)
};

// The tap and D gradients of an empty input: zeros.
inline void zero_tap_grads(const Grads& out, int64_t channels) {
  if (out.dtaps) std::memset(out.dtaps, 0, channels * kTaps * sizeof(float));
  if (out.dskip) std::memset(out.dskip, 0, channels * sizeof(float));
}

// dtaps and dD from per-task partials[part][c][k] (dtaps for k < 25, dD for k = 25), summed over the `parts` in a
// fixed order. Called inside the backward's parallel region, whose threads share the loop over channels.
inline void sum_tap_partials(const std::vector<double>& partials, int64_t parts, int64_t channels, const Grads& out) {
#pragma omp for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    double sums[kPartials] = {};
    for (int64_t part = 0; part < parts; ++part) {
      const double* partial = partials.data() + (part * channels + c) * kPartials;
      for (int k = 0; k < kPartials; ++k) sums[k] += partial[k];
    }
    if (out.dtaps)
      for (int k = 0; k < kTaps; ++k) out.dtaps[c * kTaps + k] = static_cast<float>(sums[k]);
    if (out.dskip) out.dskip[c] = static_cast<float>(sums[kTaps]);
  }
}

template <int VW>
void backward(const Inputs& in, const Grads& out, int threads) {
  typedef typename Vec<VW>::type V;
  const Geometry g = geometry<VW>(in.height, in.width);
  const int64_t w = g.width, plane_size = g.height * g.width, channels = in.channels;
  const int64_t groups = (channels + kChannelGroup - 1) / kChannelGroup;
  const int64_t tasks = in.batch * groups * g.blocks;
  const int64_t chunk = chunk_size(tasks, threads);
  const bool need_partials = out.dtaps || out.dskip;
  const bool need_df = out.dh || out.dtaps;
  const bool need_h = out.dtaps || out.dobs;
  // partials[(b * blocks + block) * C + c][k]; dobs_partial[(b * groups + group) * H * W + pixel].
  std::vector<double> partials(need_partials ? in.batch * g.blocks * channels * kPartials : 0, 0.0);
  std::vector<float> dobs_partial(out.dobs ? in.batch * groups * plane_size : 0, 0.0f);
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<float> hb(need_h ? (g.block_rows + 2 * kHalo) * g.stride : 0, 0.0f);
    std::vector<float> dfb(need_df ? (g.block_rows + 4 * kHalo) * g.stride : 0, 0.0f);
    std::vector<float> dp(out.dh ? (g.block_rows + 1) * g.stride : 0, 0.0f);  // + 1: `sums`
    const float* h_origin = hb.data() + kHalo * g.stride + kHalo;         // h at plane pixel (r0, 0)
    const float* df_origin = dfb.data() + 2 * kHalo * (g.stride + 1);     // dF at plane pixel (r0, 0)
#pragma omp for schedule(dynamic, chunk)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t block = task % g.blocks, group = task / g.blocks % groups, b = task / g.blocks / groups;
      const int64_t r0 = block * g.block_rows, r1 = std::min(g.height, r0 + g.block_rows);
      const int64_t c_end = std::min(channels, (group + 1) * kChannelGroup);
      const float* obs = in.obs ? in.obs + b * plane_size : nullptr;
      for (int64_t c = group * kChannelGroup; c < c_end; ++c) {
        const int64_t plane = b * channels + c;
        const float* taps = in.taps + c * kTaps;
        const float* dy = out.dy + plane * plane_size;
        if (need_h) pad_replicate(in.h + plane * plane_size, g, r0, r1, hb.data());
        if (need_df) pad_zero(dy, obs, g, r0, r1, dfb.data());
        if (out.dh) {
          float* sums = dp.data() + g.block_rows * g.stride;
          adjoint<VW>(dfb.data(), g, r0, r1, taps, dp.data(), sums, out.dh + plane * plane_size);
        }
        if (need_partials) {
          double* partial = partials.data() + ((b * g.blocks + block) * channels + c) * kPartials;
          if (out.dtaps) {
            // Lane i of acc[k] sums dF * h[shifted] over the pixels x = i (mod VW); dF is zero past the row's end.
            V acc[kTaps] = {};
            for (int64_t y = r0; y < r1; ++y) {
              const float* df_row = df_origin + (y - r0) * g.stride;
              const float* h_row = h_origin + (y - r0) * g.stride;
              for (int64_t x = 0; x < w; x += VW) {
                const V df = load<VW>(df_row + x);
#pragma GCC unroll 25
                for (int k = 0; k < kTaps; ++k) acc[k] += df * load<VW>(h_row + kDy[k] * g.stride + x + kDx[k]);
              }
            }
            for (int k = 0; k < kTaps; ++k) {
              double sum = 0.0;
              for (int i = 0; i < VW; ++i) sum += acc[k][i];
              partial[k] = sum;
            }
          }
          if (out.dskip) {
            const float* u = in.u + plane * plane_size;
            double sum = 0.0;
            for (int64_t y = r0; y < r1; ++y) {
              float row_sum = 0.0f;
              for (int64_t x = 0; x < w; ++x) row_sum += dy[y * w + x] * u[y * w + x];
              sum += row_sum;
            }
            partial[kTaps] = sum;
          }
        }
        if (out.du) {
          const float d = in.skip[c];
          float* du = out.du + plane * plane_size;
          for (int64_t p = r0 * w; p < r1 * w; ++p) du[p] = dy[p] * d;
        }
        if (out.dobs) {
          // dC = sum over channels of dy * F: this group's channels in order, into its own partial plane.
          float* dst = dobs_partial.data() + (b * groups + group) * plane_size;
          const bool first_channel = c == group * kChannelGroup;
          sum_taps<VW, 1>(h_origin, g.stride, w, r0, r1, taps,
                          [&](int64_t y, int64_t x0, int64_t first, int64_t count, V v) {
                            for (int64_t i = first; i < count; ++i) {
                              const int64_t p = y * w + x0 + i;
                              dst[p] = first_channel ? dy[p] * v[i] : dst[p] + dy[p] * v[i];
                            }
                          });
        }
      }
    }
    if (need_partials) sum_tap_partials(partials, in.batch * g.blocks, channels, out);
    if (out.dobs) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < in.batch; ++b) {
        float* dst = out.dobs + b * plane_size;
        std::memcpy(dst, dobs_partial.data() + b * groups * plane_size, plane_size * sizeof(float));
        for (int64_t group = 1; group < groups; ++group) {
          const float* src = dobs_partial.data() + (b * groups + group) * plane_size;
          for (int64_t p = 0; p < plane_size; ++p) dst[p] += src[p];
        }
      }
    }
  }
}

// ---- Token-major layout ---------------------------------------------------------------------------------------------
// h, u, out, dy, dh and du (batch, height, width, channels), channels innermost: the layout of the blocks' tokens, so
// that the mixer needs no transposed copy on either side of the fusion. The channels lie in the vector lanes: an output
// pixel's 25 source pixels are clamped once and each is a contiguous run of `channels` floats, so the replicate border
// costs nothing. A task is a row (forward) or a block of kTokenRows rows (backward) of one batch element.

constexpr int TVW = kLanes;
typedef Vec<TVW>::type TV;
constexpr int64_t kTokenRows = 4;

// Per-channel vectors padded with zeros to a whole number of TVW lanes: taps as taps_t[k * padded + c], and D.
struct ChannelVectors {
  int64_t padded;
  std::vector<float> taps_t, skip;
  ChannelVectors(const Inputs& in) : padded(round_up(in.channels, TVW)) {
    taps_t.assign(kTaps * padded, 0.0f);
    skip.assign(padded, 0.0f);
    for (int64_t c = 0; c < in.channels; ++c) {
      for (int k = 0; k < kTaps; ++k) taps_t[k * padded + c] = in.taps[c * kTaps + k];
      if (in.skip) skip[c] = in.skip[c];
    }
  }
};

// The 25 source pixels of each pixel of rows y0 .. y1 - 1 of a height x width image, as float offsets into the image
// (pixel index * channels): src[((y - y0) * width + x) * kTaps + k].
void token_sources(int64_t height, int64_t width, int64_t channels, int64_t y0, int64_t y1, std::vector<int64_t>& src) {
  src.resize((y1 - y0) * width * kTaps);
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = 0; x < width; ++x) {
      int64_t* dst = &src[((y - y0) * width + x) * kTaps];
      for (int k = 0; k < kTaps; ++k) {
        dst[k] = (clamp(y + kDy[k], 0, height - 1) * width + clamp(x + kDx[k], 0, width - 1)) * channels;
      }
    }
  }
}

// The taps of channels c .. c + TVW - 1, one vector per tap: loaded once for all the pixels of a task (the loops run
// over channel vectors outside and pixels inside, so that the taps stay in L1 whatever the number of channels).
struct TapVectors {
  TV t[kTaps];
  TapVectors(const ChannelVectors& cv, int64_t c) {
    for (int k = 0; k < kTaps; ++k) t[k] = load<TVW>(&cv.taps_t[k * cv.padded + c]);
  }
  // F at one pixel, channels c .. c + n - 1, from its sources' offsets.
  inline TV fuse(const float* h, const int64_t* src, int64_t c, int64_t n) const {
    TV acc = TV{};
#pragma GCC unroll 25
    for (int k = 0; k < kTaps; ++k) acc += t[k] * load_n<TV>(h + src[k] + c, n);
    return acc;
  }
};

void forward_tokens(const Inputs& in, float* out, int threads) {
  const ChannelVectors cv(in);
  const int64_t channels = in.channels, image = in.height * in.width, tasks = in.batch * in.height;
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<int64_t> src;
#pragma omp for schedule(dynamic, chunk_size(tasks, threads))
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / in.height, y = task % in.height, row = b * image + y * in.width;
      const float* h = in.h + b * image * channels;
      token_sources(in.height, in.width, channels, y, y + 1, src);
      for (int64_t c = 0; c < channels; c += TVW) {
        const int64_t n = std::min<int64_t>(TVW, channels - c);
        const TapVectors taps(cv, c);
        const TV skip = load<TVW>(&cv.skip[c]);
        for (int64_t x = 0; x < in.width; ++x) {
          TV acc = taps.fuse(h, &src[x * kTaps], c, n);
          const int64_t at = (row + x) * channels + c;
          if (in.obs) acc = acc * in.obs[row + x] + skip * load_n<TV>(in.u + at, n);  // y = F * C + D * u
          store_n(out + at, acc, n);
        }
      }
    }
  }
}

// The source rows q (or columns) whose clamped read q + d lands on p, for every p in [0, n) and each of the 25 taps'
// offsets: an interval, since clamp is monotone; first[k * n + p] > last[k * n + p] when empty.
void preimages(int64_t n, const int* offsets, std::vector<int64_t>& first, std::vector<int64_t>& last) {
  first.assign(kTaps * n, n);
  last.assign(kTaps * n, -1);
  for (int k = 0; k < kTaps; ++k) {
    for (int64_t q = 0; q < n; ++q) {
      const int64_t p = k * n + clamp(q + offsets[k], 0, n - 1);
      first[p] = std::min(first[p], q);
      last[p] = std::max(last[p], q);
    }
  }
}

// dtaps of rows y0 .. y1 - 1 of one image, dtaps_k += dF * h[source k] summed over their pixels, into
// acc[k * padded + c]; `src` holds the rows' sources (token_sources).
void dtaps_rows(const Inputs& in, const ChannelVectors& cv, const float* h, const float* dy, const float* obs,
                const std::vector<int64_t>& src, int64_t y0, int64_t y1, float* acc) {
  const int64_t channels = in.channels, first = y0 * in.width, pixels = (y1 - y0) * in.width;
  for (int64_t c = 0; c < channels; c += TVW) {
    const int64_t n = std::min<int64_t>(TVW, channels - c);
    TV sums[kTaps] = {};
    for (int64_t i = 0; i < pixels; ++i) {
      const TV df = load_n<TV>(dy + (first + i) * channels + c, n) * (obs ? obs[first + i] : 1.0f);
      const int64_t* s = &src[i * kTaps];
#pragma GCC unroll 25
      for (int k = 0; k < kTaps; ++k) sums[k] += df * load_n<TV>(h + s[k] + c, n);
    }
    for (int k = 0; k < kTaps; ++k) store<TVW>(acc + k * cv.padded + c, sums[k]);
  }
}

// dC of rows y0 .. y1 - 1 of one image: the sum over channels of dy * F, per pixel, into dobs; `lanes` is a scratch
// of one vector per pixel.
void dobs_rows(const Inputs& in, const ChannelVectors& cv, const float* h, const float* dy,
               const std::vector<int64_t>& src, int64_t y0, int64_t y1, std::vector<TV>& lanes, float* dobs) {
  const int64_t channels = in.channels, first = y0 * in.width, pixels = (y1 - y0) * in.width;
  lanes.assign(pixels, TV{});
  for (int64_t c = 0; c < channels; c += TVW) {
    const int64_t n = std::min<int64_t>(TVW, channels - c);
    const TapVectors taps(cv, c);
    for (int64_t i = 0; i < pixels; ++i) {
      lanes[i] += load_n<TV>(dy + (first + i) * channels + c, n) * taps.fuse(h, &src[i * kTaps], c, n);
    }
  }
  for (int64_t i = 0; i < pixels; ++i) {
    float total = 0.0f;
    for (int j = 0; j < TVW; ++j) total += lanes[i][j];
    dobs[first + i] = total;
  }
}

// dh of rows y0 .. y1 - 1 of one image, gathered: tap k of pixel p collects dF = dy * C over the output pixels whose
// clamped read k landed on p (`preimages`: one pixel, none, or at the border a box of up to 6 x 6).
void dh_rows(const Inputs& in, const ChannelVectors& cv, const std::vector<int64_t>& row_first,
             const std::vector<int64_t>& row_last, const std::vector<int64_t>& col_first,
             const std::vector<int64_t>& col_last, const float* dy, const float* obs, int64_t y0, int64_t y1,
             float* dh) {
  const int64_t channels = in.channels, padded = cv.padded;
  // A pixel's sources: a tap's vector of weights scaled by C at the source pixel, and the source pixel.
  std::vector<int> item_tap(kTaps * 36);
  std::vector<float> item_obs(kTaps * 36);
  std::vector<int64_t> item_pixel(kTaps * 36);
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = 0; x < in.width; ++x) {
      int items = 0;
      for (int k = 0; k < kTaps; ++k) {
        for (int64_t qy = row_first[k * in.height + y]; qy <= row_last[k * in.height + y]; ++qy) {
          for (int64_t qx = col_first[k * in.width + x]; qx <= col_last[k * in.width + x]; ++qx) {
            const int64_t q = qy * in.width + qx;
            item_tap[items] = k, item_obs[items] = obs ? obs[q] : 1.0f, item_pixel[items++] = q * channels;
          }
        }
      }
      // Item by item, each a pass over the pixel's channels (which stay in L1 across the items).
      float* dst = dh + (y * in.width + x) * channels;
      std::memset(dst, 0, channels * sizeof(float));
      for (int i = 0; i < items; ++i) {
        const float* taps = &cv.taps_t[item_tap[i] * padded];
        const float* src = dy + item_pixel[i];
        const float w = item_obs[i];
        for (int64_t c = 0; c < channels; c += TVW) {
          const int64_t n = std::min<int64_t>(TVW, channels - c);
          store_n(dst + c, load_n<TV>(dst + c, n) + load<TVW>(taps + c) * (w * load_n<TV>(src + c, n)), n);
        }
      }
    }
  }
}

// Gradients of forward_tokens, the same as backward's, in passes over a task's rows (dtaps; dC; dh; du and dD),
// each run only when asked for.
void backward_tokens(const Inputs& in, const Grads& out, int threads) {
  const ChannelVectors cv(in);
  const int64_t channels = in.channels, padded = cv.padded, image = in.height * in.width;
  const int64_t blocks = (in.height + kTokenRows - 1) / kTokenRows, tasks = in.batch * blocks;
  std::vector<int64_t> row_first, row_last, col_first, col_last;
  if (out.dh) {
    preimages(in.height, kDy, row_first, row_last);
    preimages(in.width, kDx, col_first, col_last);
  }
  // partials[task][c][k], as in backward; each task accumulates acc[k * padded + c] first.
  const bool need_partials = out.dtaps || out.dskip;
  std::vector<double> partials(need_partials ? tasks * channels * kPartials : 0, 0.0);
#pragma omp parallel num_threads(threads) if (tasks > 1)
  {
    std::vector<float> acc(need_partials ? kPartials * padded : 0);
    std::vector<int64_t> src;
    std::vector<TV> lanes;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, y0 = task % blocks * kTokenRows, y1 = std::min(in.height, y0 + kTokenRows);
      const float* h = in.h + b * image * channels;
      const float* dy = out.dy + b * image * channels;
      const float* obs = in.obs ? in.obs + b * image : nullptr;
      float* dobs = out.dobs ? out.dobs + b * image : nullptr;
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (out.dtaps || out.dobs) token_sources(in.height, in.width, channels, y0, y1, src);
      if (out.dtaps) dtaps_rows(in, cv, h, dy, obs, src, y0, y1, acc.data());
      if (out.dobs) dobs_rows(in, cv, h, dy, src, y0, y1, lanes, dobs);
      if (out.dh) {
        dh_rows(in, cv, row_first, row_last, col_first, col_last, dy, obs, y0, y1, out.dh + b * image * channels);
      }
      if (out.du || out.dskip) {
        for (int64_t pixel = y0 * in.width; pixel < y1 * in.width; ++pixel) {
          const int64_t at = (b * image + pixel) * channels;
          for (int64_t c = 0; c < channels; c += TVW) {
            const int64_t n = std::min<int64_t>(TVW, channels - c);
            const TV vdy = load_n<TV>(out.dy + at + c, n);
            if (out.du) store_n(out.du + at + c, vdy * load<TVW>(&cv.skip[c]), n);
            if (out.dskip) {
              float* a = &acc[kTaps * padded + c];
              store<TVW>(a, load<TVW>(a) + vdy * load_n<TV>(in.u + at + c, n));
            }
          }
        }
      }
      if (need_partials) {
        double* partial = partials.data() + task * channels * kPartials;
        for (int64_t c = 0; c < channels; ++c) {
          for (int k = 0; k < kPartials; ++k) partial[c * kPartials + k] = acc[k * padded + c];
        }
      }
    }
    if (need_partials) sum_tap_partials(partials, tasks, channels, out);
  }
}

}  // namespace

extern "C" {

// Copies the 25 (dy, dx) offsets into dy and dx; returns their count (checked against FUSION_OFFSETS on load).
int sm_fusion_offsets(int* dy, int* dx) {
  for (int k = 0; k < kTaps; ++k) {
    dy[k] = kDy[k];
    dx[k] = kDx[k];
  }
  return kTaps;
}

// out = F(h) (obs null), or out = F(h) * obs[b] + skip[c] * u. Contiguous float32; taps (C, 25).
void sm_fusion_forward(const float* h, const float* taps, const float* obs, const float* u, const float* skip,
                       float* out, int64_t batch, int64_t channels, int64_t height, int64_t width, int threads) {
  const Inputs in{h, taps, obs, u, skip, batch, channels, height, width};
  if (batch * channels * height * width == 0) return;
  if (width <= 8 || kLanes < 16) {
    forward<8>(in, out, threads);
  } else {
    forward<16>(in, out, threads);
  }
}

// Gradients of sm_fusion_forward's output for the upstream gradient dy; each output pointer may be null (not asked
// for). Without obs, dF = dy and only dh and dtaps exist.
void sm_fusion_backward(const float* h, const float* taps, const float* obs, const float* u, const float* skip,
                        const float* dy, float* dh, float* dtaps, float* dobs, float* du, float* dskip, int64_t batch,
                        int64_t channels, int64_t height, int64_t width, int threads) {
  const Inputs in{h, taps, obs, u, skip, batch, channels, height, width};
  const Grads grads{dy, dh, dtaps, dobs, du, dskip};
  if (batch * channels * height * width == 0) return zero_tap_grads(grads, channels);
  if (width <= 8 || kLanes < 16) {
    backward<8>(in, grads, threads);
  } else {
    backward<16>(in, grads, threads);
  }
}

// sm_fusion_forward and sm_fusion_backward on the token-major layout: h, u, out, dy, dh and du
// (batch, height, width, channels); taps (C, 25), obs (B, H, W) and skip (C,) as there.
void sm_fusion_forward_tokens(const float* h, const float* taps, const float* obs, const float* u, const float* skip,
                              float* out, int64_t batch, int64_t channels, int64_t height, int64_t width,
                              int threads) {
  if (batch * channels * height * width == 0) return;
  forward_tokens(Inputs{h, taps, obs, u, skip, batch, channels, height, width}, out, threads);
}

void sm_fusion_backward_tokens(const float* h, const float* taps, const float* obs, const float* u, const float* skip,
                               const float* dy, float* dh, float* dtaps, float* dobs, float* du, float* dskip,
                               int64_t batch, int64_t channels, int64_t height, int64_t width, int threads) {
  const Grads grads{dy, dh, dtaps, dobs, du, dskip};
  if (batch * channels * height * width == 0) return zero_tap_grads(grads, channels);
  backward_tokens(Inputs{h, taps, obs, u, skip, batch, channels, height, width}, grads, threads);
}

}  // extern "C"
