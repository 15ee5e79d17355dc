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
#include "fusion_tile.cuh"
#include "state_fusion.h"

namespace spatial_mamba {
namespace {

using namespace fusion_tile;

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
  load_taps(w, p.taps, plane % p.shape.channels);
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
  load_taps(w, p.taps, plane % p.shape.channels);
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
  float* partial = dtaps_partial + (plane * gridDim.y + blockIdx.y) * kFusionTaps;
  block_sum_store(acc, reduced, [partial](int k, float total) { partial[k] = total; });
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
  const int64_t offset = plane * H * W;
  const float* plane_taps = p.taps + (plane % p.shape.channels) * kFusionTaps;
  const T* __restrict__ dy_plane = dy + offset;
  int y, x;
  border_pixel(i, H, W, y, x);
  const float acc = fold_border(y, x, H, W, plane_taps, [dy_plane](int pixel) { return to_float(dy_plane[pixel]); });
  dh[offset + y * W + x] = from_float<T>(acc);
}

template <typename T>
cudaError_t launch_fwd(const FusionFwdParams& p, cudaStream_t stream) {
  const int tiles_x = static_cast<int>((p.shape.width + kTile - 1) / kTile);
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.channels), static_cast<unsigned>(fusion_tiles(p.shape)));
  state_fusion_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(p, tiles_x);
  return cudaGetLastError();
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
