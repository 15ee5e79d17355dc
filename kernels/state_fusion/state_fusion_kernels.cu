// Forward and backward kernels of the one-pass state fusion (see state_fusion.h).
//
// Forward: a block of 256 threads owns a 32 x 32 output tile of one plane. It stages the tile and its halo of 5
// through clamped indices (replicate padding) in shared memory, as fp32, with 2-D loops (a row per warp, a column
// per lane: no division); each thread then computes 4 outputs of one column from 25 shared-memory taps. HBM sees one
// read of h (plus the halo, 1.7x at 32 x 32, mostly served by L2) and one write of out.
//
// Backward, tile kernel: stages h (clamped) and dy (zero outside the plane) the same way.
//   dtaps[k] = Σ_{y,x} dy[y, x] h[clamp(y + dy_k), clamp(x + dx_k)]: 25 per-thread sums, reduced over the block by
//     warp shuffles and shared memory into one partial per (plane, tile); the binding sums the partials (no
//     atomics: deterministic).
//   dh[y, x] = Σ_k taps[k] dy[y - dy_k, x - dx_k] (zero outside): the adjoint wherever no clamp folds several
//     outputs onto one pixel, i.e. off the first and last rows and columns.
// Backward, border kernel: one thread per border pixel gathers, for each tap, dy over the interval of outputs whose
// clamped read lands on it (at most |shift| + 1 along each axis) and overwrites dh there. It runs after the tile
// kernel on the same stream.
#include "common/float_io.cuh"
#include "state_fusion.h"

namespace spatial_mamba {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;                        // output tile: kTile x kTile
constexpr int kRows = kTile * 32 / kThreads;     // outputs per thread, one column
constexpr int kStage = kTile + 2 * kFusionHalo;  // staged tile side
constexpr int kBorderThreads = 128;

__device__ __forceinline__ int clamp_index(int i, int n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Stages the kStage x kStage window at (oy0 - 5, ox0 - 5) of one plane as fp32: clamped, or zero outside the plane.
template <typename T, bool kClamp>
__device__ __forceinline__ void stage(float* tile, const T* plane, int H, int W, int oy0, int ox0) {
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < kStage; r += kThreads / 32) {
    const int gy = oy0 - kFusionHalo + r;
    for (int c = lane; c < kStage; c += 32) {
      const int gx = ox0 - kFusionHalo + c;
      float v;
      if (kClamp) {
        v = to_float(plane[clamp_index(gy, H) * W + clamp_index(gx, W)]);
      } else {
        v = gy >= 0 && gy < H && gx >= 0 && gx < W ? to_float(plane[gy * W + gx]) : 0.f;
      }
      tile[r * kStage + c] = v;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    state_fusion_fwd_kernel(FusionFwdParams p, int tiles_x) {
  __shared__ float tile[kStage * kStage];
  const T* __restrict__ h = static_cast<const T*>(p.h);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int64_t plane = blockIdx.x;
  const int oy0 = static_cast<int>(blockIdx.y / tiles_x) * kTile;
  const int ox0 = static_cast<int>(blockIdx.y % tiles_x) * kTile;
  const int64_t offset = plane * H * W;
  stage<T, true>(tile, h + offset, H, W, oy0, ox0);
  float w[kFusionTaps];
  const float* plane_taps = p.taps + (plane % p.shape.channels) * kFusionTaps;
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) w[k] = plane_taps[k];
  __syncthreads();
  const int lx = threadIdx.x % 32;
  const int ly0 = threadIdx.x / 32 * kRows;
  const int x = ox0 + lx;
  if (x >= W) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int y = oy0 + ly0 + r;
    if (y >= H) break;
    const float* centre = tile + (ly0 + r + kFusionHalo) * kStage + lx + kFusionHalo;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < kFusionTaps; ++k) acc += w[k] * centre[fusion_tap_dy(k) * kStage + fusion_tap_dx(k)];
    out[offset + y * W + x] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    state_fusion_bwd_tile_kernel(FusionBwdParams p, int tiles_x) {
  __shared__ float h_tile[kStage * kStage];
  __shared__ float dy_tile[kStage * kStage];
  __shared__ float reduced[kThreads / 32][kFusionTaps];
  const T* __restrict__ h = static_cast<const T*>(p.h);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  T* __restrict__ dh = static_cast<T*>(p.dh);
  float* __restrict__ dtaps_partial = p.dtaps_partial;
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int64_t plane = blockIdx.x;
  const int oy0 = static_cast<int>(blockIdx.y / tiles_x) * kTile;
  const int ox0 = static_cast<int>(blockIdx.y % tiles_x) * kTile;
  const int64_t offset = plane * H * W;
  if (dtaps_partial != nullptr) stage<T, true>(h_tile, h + offset, H, W, oy0, ox0);
  stage<T, false>(dy_tile, dy + offset, H, W, oy0, ox0);
  float w[kFusionTaps];
  const float* plane_taps = p.taps + (plane % p.shape.channels) * kFusionTaps;
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) w[k] = plane_taps[k];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int ly0 = warp * kRows;
  const int x = ox0 + lane;

  if (dh != nullptr && x < W) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int y = oy0 + ly0 + r;
      if (y >= H) break;
      const float* centre = dy_tile + (ly0 + r + kFusionHalo) * kStage + lane + kFusionHalo;
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kFusionTaps; ++k) acc += w[k] * centre[-fusion_tap_dy(k) * kStage - fusion_tap_dx(k)];
      dh[offset + y * W + x] = from_float<T>(acc);
    }
  }

  if (dtaps_partial == nullptr) return;  // uniform across the block: no barrier follows for anyone
  float acc[kFusionTaps];
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) acc[k] = 0.f;
  // Outputs outside the plane have dy = 0 in the staged tile, so every thread runs all kRows (no divergence).
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = (ly0 + r + kFusionHalo) * kStage + lane + kFusionHalo;
    const float g = dy_tile[row];
#pragma unroll
    for (int k = 0; k < kFusionTaps; ++k) acc[k] += g * h_tile[row + fusion_tap_dy(k) * kStage + fusion_tap_dx(k)];
  }
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) {
    float v = acc[k];
#pragma unroll
    for (int s = 16; s > 0; s /= 2) v += __shfl_xor_sync(0xffffffffu, v, s);
    if (lane == 0) reduced[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kFusionTaps) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) total += reduced[i][threadIdx.x];
    dtaps_partial[(plane * gridDim.y + blockIdx.y) * kFusionTaps + threadIdx.x] = total;
  }
}

// The outputs o with clamp(o + shift, 0, n - 1) == i: the interval [lo, hi] (empty when lo > hi).
__device__ __forceinline__ void source_interval(int i, int shift, int n, int& lo, int& hi) {
  lo = i == 0 ? 0 : i - shift;
  hi = i == n - 1 ? n - 1 : i - shift;
  lo = lo < 0 ? 0 : lo;
  hi = hi > n - 1 ? n - 1 : hi;
}

template <typename T>
__global__ void __launch_bounds__(kBorderThreads)
    state_fusion_dgrad_border_kernel(FusionBwdParams p, int n_border) {
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  T* __restrict__ dh = static_cast<T*>(p.dh);
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int i = blockIdx.y * kBorderThreads + threadIdx.x;
  if (i >= n_border) return;
  const int64_t plane = blockIdx.x;
  // Border pixel i: the first row (i < W), the last row (next W, when H > 1), then the first and last columns of
  // the rows in between.
  const int full_rows = H < 2 ? H : 2;
  const int side_cols = W < 2 ? W : 2;
  int y, x;
  if (i < full_rows * W) {
    y = (i / W) * (H - 1);
    x = i % W;
  } else {
    const int j = i - full_rows * W;
    y = 1 + j / side_cols;
    x = (j % side_cols) * (W - 1);
  }
  const int64_t offset = plane * H * W;
  const float* plane_taps = p.taps + (plane % p.shape.channels) * kFusionTaps;
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < kFusionTaps; ++k) {
    int lo_y, hi_y, lo_x, hi_x;
    source_interval(y, fusion_tap_dy(k), H, lo_y, hi_y);
    source_interval(x, fusion_tap_dx(k), W, lo_x, hi_x);
    float sum = 0.f;
    for (int sy = lo_y; sy <= hi_y; ++sy) {
      for (int sx = lo_x; sx <= hi_x; ++sx) sum += to_float(dy[offset + sy * W + sx]);
    }
    acc += plane_taps[k] * sum;
  }
  dh[offset + y * W + x] = from_float<T>(acc);
}

template <typename T>
cudaError_t launch_fwd(const FusionFwdParams& p, cudaStream_t stream) {
  const int tiles_x = static_cast<int>((p.shape.width + kTile - 1) / kTile);
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.channels), static_cast<unsigned>(fusion_tiles(p.shape)));
  state_fusion_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(p, tiles_x);
  return cudaGetLastError();
}

int border_pixels(int64_t H, int64_t W) {
  return static_cast<int>(W * (H < 2 ? H : 2) + (H > 2 ? H - 2 : 0) * (W < 2 ? W : 2));
}

template <typename T>
cudaError_t launch_bwd(const FusionBwdParams& p, cudaStream_t stream) {
  const int tiles_x = static_cast<int>((p.shape.width + kTile - 1) / kTile);
  const unsigned planes = static_cast<unsigned>(p.shape.batch * p.shape.channels);
  const dim3 grid(planes, static_cast<unsigned>(fusion_tiles(p.shape)));
  state_fusion_bwd_tile_kernel<T><<<grid, kThreads, 0, stream>>>(p, tiles_x);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || p.dh == nullptr) return error;
  const int n_border = border_pixels(p.shape.height, p.shape.width);
  const dim3 border_grid(planes, static_cast<unsigned>((n_border + kBorderThreads - 1) / kBorderThreads));
  state_fusion_dgrad_border_kernel<T><<<border_grid, kBorderThreads, 0, stream>>>(p, n_border);
  return cudaGetLastError();
}

}  // namespace

int64_t fusion_tiles(const FusionShape& shape) {
  return ((shape.height + kTile - 1) / kTile) * ((shape.width + kTile - 1) / kTile);
}

cudaError_t launch_state_fusion_fwd(const FusionFwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.channels * p.shape.height * p.shape.width == 0) return cudaSuccess;
  switch (p.kind) {
    case ScalarKind::kFloat16:
      return launch_fwd<__half>(p, stream);
    case ScalarKind::kBFloat16:
      return launch_fwd<__nv_bfloat16>(p, stream);
    default:
      return launch_fwd<float>(p, stream);
  }
}

cudaError_t launch_state_fusion_bwd(const FusionBwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.channels * p.shape.height * p.shape.width == 0) return cudaSuccess;
  if (p.dh == nullptr && p.dtaps_partial == nullptr) return cudaSuccess;
  switch (p.kind) {
    case ScalarKind::kFloat16:
      return launch_bwd<__half>(p, stream);
    case ScalarKind::kBFloat16:
      return launch_bwd<__nv_bfloat16>(p, stream);
    default:
      return launch_bwd<float>(p, stream);
  }
}

}  // namespace spatial_mamba
