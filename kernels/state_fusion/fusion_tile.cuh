// Device code shared by the state fusion kernels (state_fusion_kernels.cu) and the fused observation kernels
// (observation_kernels.cu): the 32 x 32 output tile of one plane staged with its halo of 5 in shared memory, the
// block reduction of per-thread sums into one partial per block, and the border fold of the input gradient.
#pragma once

#include "common/float_io.cuh"
#include "state_fusion.h"

namespace spatial_mamba {
namespace fusion_tile {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;                        // output tile: kTile x kTile
constexpr int kRows = kTile * 32 / kThreads;     // outputs per thread, one column
constexpr int kStage = kTile + 2 * kFusionHalo;  // staged tile side
constexpr int kBorderThreads = 128;

__device__ __forceinline__ int clamp_index(int i, int n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Fills the kStage x kStage window at (oy0 - 5, ox0 - 5) of one H x W plane as fp32 with 2-D loops (a row per warp,
// a column per lane: no division): tile[r * kStage + c] = load(pixel, r * kStage + c), where pixel is the clamped
// pixel index (kClamp: replicate padding), or -1 outside the plane (not kClamp), where load is not called and the
// tile holds 0. Every thread visits the same slots whatever `load` is, so a thread may read back, in a later call,
// the slots it wrote itself in an earlier one without a barrier.
template <bool kClamp, typename Load>
__device__ __forceinline__ void stage_window(float* tile, int H, int W, int oy0, int ox0, Load load) {
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < kStage; r += kWarps) {
    const int gy = oy0 - kFusionHalo + r;
    for (int c = lane; c < kStage; c += 32) {
      const int gx = ox0 - kFusionHalo + c;
      const int slot = r * kStage + c;
      if (kClamp) {
        tile[slot] = load(clamp_index(gy, H) * W + clamp_index(gx, W), slot);
      } else {
        tile[slot] = gy >= 0 && gy < H && gx >= 0 && gx < W ? load(gy * W + gx, slot) : 0.f;
      }
    }
  }
}

// Stages one plane of T: clamped, or zero outside the plane.
template <typename T, bool kClamp>
__device__ __forceinline__ void stage(float* tile, const T* plane, int H, int W, int oy0, int ox0) {
  stage_window<kClamp>(tile, H, W, oy0, ox0, [plane](int pixel, int) { return to_float(plane[pixel]); });
}

// Loads the 25 taps of one channel into registers.
__device__ __forceinline__ void load_taps(float (&w)[kFusionTaps], const float* taps, int64_t channel) {
  const float* row = taps + channel * kFusionTaps;
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) w[k] = row[k];
}

// Sums each of the N per-thread values over the block (warp shuffles, then `reduced` in shared memory); thread j < N
// then calls store(j, sum j). Every thread of the block must call it; it returns with the first N threads' reads of
// `reduced` unguarded, so the caller needs a barrier before `reduced` is written again.
template <int N, typename Store>
__device__ __forceinline__ void block_sum_store(const float (&values)[N], float (&reduced)[kWarps][N], Store store) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float v = values[k];
#pragma unroll
    for (int s = 16; s > 0; s /= 2) v += __shfl_xor_sync(0xffffffffu, v, s);
    if (lane == 0) reduced[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < N) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += reduced[i][threadIdx.x];
    store(static_cast<int>(threadIdx.x), total);
  }
}

// The outputs o with clamp(o + shift, 0, n - 1) == i: the interval [lo, hi] (empty when lo > hi).
__device__ __forceinline__ void source_interval(int i, int shift, int n, int& lo, int& hi) {
  lo = i == 0 ? 0 : i - shift;
  hi = i == n - 1 ? n - 1 : i - shift;
  lo = lo < 0 ? 0 : lo;
  hi = hi > n - 1 ? n - 1 : hi;
}

// The pixels on the first and last rows and columns of an H x W plane.
inline int border_pixels(int64_t H, int64_t W) {
  return static_cast<int>(W * (H < 2 ? H : 2) + (H > 2 ? H - 2 : 0) * (W < 2 ? W : 2));
}

// Border pixel i: the first row (i < W), the last row (next W, when H > 1), then the first and last columns of the
// rows in between.
__device__ __forceinline__ void border_pixel(int i, int H, int W, int& y, int& x) {
  const int full_rows = H < 2 ? H : 2;
  const int side_cols = W < 2 ? W : 2;
  if (i < full_rows * W) {
    y = (i / W) * (H - 1);
    x = i % W;
  } else {
    const int j = i - full_rows * W;
    y = 1 + j / side_cols;
    x = (j % side_cols) * (W - 1);
  }
}

// The adjoint of the fusion at pixel (y, x) with replicate borders: Σ_k w[k] Σ {g(o) : clamp(o + shift_k) = (y, x)},
// where g(pixel index) is the output gradient; the outputs of each tap form an interval along each axis (at most
// |shift| + 1 long), so this is a gather.
template <typename Grad>
__device__ __forceinline__ float fold_border(int y, int x, int H, int W, const float* w, Grad g) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) {
    int lo_y, hi_y, lo_x, hi_x;
    source_interval(y, fusion_tap_dy(k), H, lo_y, hi_y);
    source_interval(x, fusion_tap_dx(k), W, lo_x, hi_x);
    float sum = 0.f;
    for (int sy = lo_y; sy <= hi_y; ++sy) {
      for (int sx = lo_x; sx <= hi_x; ++sx) sum += g(sy * W + sx);
    }
    acc += w[k] * sum;
  }
  return acc;
}

}  // namespace fusion_tile
}  // namespace spatial_mamba
