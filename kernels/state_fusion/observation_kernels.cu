// Forward and backward kernels of the fused observation y = F(h) C + D u (see state_fusion.h), built on the state
// fusion's tiles (fusion_tile.cuh).
//
// Forward: the fusion's forward kernel with the observation as its epilogue. A block of 256 threads owns a 32 x 32
// output tile of one plane (b, c), stages h with its halo of 5 (clamped: replicate padding) in shared memory, and
// each thread computes F(h) for 4 outputs of one column and writes F(h) C + D u. HBM sees one read of h and u, one
// of C per plane (shared by the channels, mostly from L2) and one write of y: F(h) never leaves the chip.
//
// Backward, tile kernel: a block owns a 32 x 32 tile of one batch element and a group of consecutive channels
// (grid: batch x tiles, channel groups). It stages the tile of C once (zero outside the plane), then for each
// channel of its group stages h (clamped) and dF = dy C (zero outside) and computes
//   dh[y, x] = Σ_k taps[k] dF[y - dy_k, x - dx_k] off the first and last rows and columns (as the fusion's),
//   dtaps[k] += dF h[clamped shift k] and F(h) from the same 25 shared-memory reads of h,
//   dC[y, x] += dy F(h), kept in registers across the channels of the group,
//   du = dy D[c], dD += dy u,
// and reduces its 25 tap sums and the dD sum over the block into one partial per (plane, tile). After its last
// channel each block writes its dC sums as one partial per channel group. The binding sums all partials: no atomics,
// deterministic.
// Backward, border kernel: one thread per border pixel folds dF over the intervals of outputs whose clamped read lands
// on it (the fusion's border kernel, with dF = dy C in place of dy) and overwrites dh there.
#include "fusion_tile.cuh"
#include "state_fusion.h"

namespace spatial_mamba {
namespace {

using namespace fusion_tile;

// Backward blocks (batch x tiles x channel groups) to aim for: about 5 waves of a 132-SM GPU at the tile kernel's 3
// resident blocks per SM (its launch bounds), so that the last wave's tail costs little.
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinGroupChannels = 8;

template <typename T, typename U>
__global__ void __launch_bounds__(kThreads)
    fused_observation_fwd_kernel(ObservationFwdParams p, int tiles_x) {
  __shared__ float tile[kStage * kStage];
  const T* __restrict__ h = static_cast<const T*>(p.h);
  const U* __restrict__ C = static_cast<const U*>(p.C);
  const U* __restrict__ u = static_cast<const U*>(p.u);
  T* __restrict__ out = static_cast<T*>(p.y);
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int64_t plane = blockIdx.x;
  const int64_t channel = plane % p.shape.channels;
  const int oy0 = static_cast<int>(blockIdx.y / tiles_x) * kTile;
  const int ox0 = static_cast<int>(blockIdx.y % tiles_x) * kTile;
  const int64_t offset = plane * H * W;
  const U* __restrict__ C_plane = C + plane / p.shape.channels * H * W;
  stage<T, true>(tile, h + offset, H, W, oy0, ox0);
  float w[kFusionTaps];
  load_taps(w, p.taps, channel);
  const float d = p.D[channel];
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
    float fused = 0.f;
#pragma unroll
    for (int k = 0; k < kFusionTaps; ++k) fused += w[k] * centre[fusion_tap_dy(k) * kStage + fusion_tap_dx(k)];
    const int pixel = y * W + x;
    out[offset + pixel] = from_float<T>(fused * to_float(C_plane[pixel]) + d * to_float(u[offset + pixel]));
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kThreads, 3)
    fused_observation_bwd_tile_kernel(ObservationBwdParams p, int tiles_x, int tiles) {
  __shared__ float h_tile[kStage * kStage];
  __shared__ float df_tile[kStage * kStage];
  __shared__ float c_tile[kStage * kStage];
  __shared__ float reduced[kWarps][kFusionTaps + 1];
  const T* __restrict__ h = static_cast<const T*>(p.h);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const U* __restrict__ C = static_cast<const U*>(p.C);
  const U* __restrict__ u = static_cast<const U*>(p.u);
  T* __restrict__ dh = static_cast<T*>(p.dh);
  U* __restrict__ du = static_cast<U*>(p.du);
  float* __restrict__ dtaps_partial = p.dtaps_partial;
  float* __restrict__ dD_partial = p.dD_partial;
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int64_t area = static_cast<int64_t>(H) * W;
  const int64_t channels = p.shape.channels;
  const int64_t b = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int oy0 = tile / tiles_x * kTile;
  const int ox0 = tile % tiles_x * kTile;
  const int64_t per_group = (channels + p.channel_groups - 1) / p.channel_groups;
  const int64_t c_begin = blockIdx.y * per_group;
  const int64_t c_end = c_begin + per_group < channels ? c_begin + per_group : channels;
  // Which stages and sums this launch needs (uniform across the grid).
  const bool need_h = dtaps_partial != nullptr || p.dC_partial != nullptr;
  const bool need_df = dh != nullptr || dtaps_partial != nullptr;
  const bool need_dy = p.dC_partial != nullptr || du != nullptr || dD_partial != nullptr;
  const bool need_sums = dtaps_partial != nullptr || dD_partial != nullptr;

  const U* __restrict__ C_plane = C + b * area;
  if (need_df) stage_window<false>(c_tile, H, W, oy0, ox0, [C_plane](int pixel, int) { return to_float(C_plane[pixel]); });
  const int lane = threadIdx.x % 32;
  const int ly0 = threadIdx.x / 32 * kRows;
  const int x = ox0 + lane;
  float dC_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) dC_sum[r] = 0.f;

  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t offset = (b * channels + c) * area;
    if (need_h) stage<T, true>(h_tile, h + offset, H, W, oy0, ox0);
    if (need_df) {
      // Each thread reads back only the slots of c_tile it staged itself (same loops): no barrier needed for it.
      const T* __restrict__ dy_plane = dy + offset;
      stage_window<false>(df_tile, H, W, oy0, ox0,
                          [dy_plane](int pixel, int slot) { return to_float(dy_plane[pixel]) * c_tile[slot]; });
    }
    float w[kFusionTaps];
    load_taps(w, p.taps, c);
    const float d = p.D[c];
    __syncthreads();

    if (dh != nullptr && x < W) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int y = oy0 + ly0 + r;
        if (y >= H) break;
        const float* centre = df_tile + (ly0 + r + kFusionHalo) * kStage + lane + kFusionHalo;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < kFusionTaps; ++k) acc += w[k] * centre[-fusion_tap_dy(k) * kStage - fusion_tap_dx(k)];
        dh[offset + y * W + x] = from_float<T>(acc);
      }
    }

    // sums[0..24]: the tap gradients; sums[25]: dD. Outputs outside the plane have dF = 0 in the staged tile, so
    // every thread runs all kRows of the tap sums (no divergence).
    float sums[kFusionTaps + 1];
#pragma unroll
    for (int k = 0; k <= kFusionTaps; ++k) sums[k] = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int slot = (ly0 + r + kFusionHalo) * kStage + lane + kFusionHalo;
      float fused = 0.f;
      if (need_h) {
        const float g = need_df ? df_tile[slot] : 0.f;
#pragma unroll
        for (int k = 0; k < kFusionTaps; ++k) {
          const float hv = h_tile[slot + fusion_tap_dy(k) * kStage + fusion_tap_dx(k)];
          sums[k] += g * hv;
          fused += w[k] * hv;
        }
      }
      const int y = oy0 + ly0 + r;
      if (need_dy && x < W && y < H) {
        const int64_t i = offset + y * W + x;
        const float g = to_float(dy[i]);
        dC_sum[r] += g * fused;
        if (du != nullptr) du[i] = from_float<U>(g * d);
        if (dD_partial != nullptr) sums[kFusionTaps] += g * to_float(u[i]);
      }
    }
    if (need_sums) {
      const int64_t slot = (b * channels + c) * tiles + tile;
      block_sum_store(sums, reduced, [=](int k, float total) {
        if (k < kFusionTaps) {
          if (dtaps_partial != nullptr) dtaps_partial[slot * kFusionTaps + k] = total;
        } else if (dD_partial != nullptr) {
          dD_partial[slot] = total;
        }
      });
    }
    __syncthreads();  // the tiles and `reduced` are rewritten for the next channel
  }

  if (p.dC_partial == nullptr || x >= W) return;
  float* __restrict__ dC_partial = p.dC_partial + (blockIdx.y * p.shape.batch + b) * area;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int y = oy0 + ly0 + r;
    if (y >= H) break;
    dC_partial[y * W + x] = dC_sum[r];
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kBorderThreads)
    fused_observation_dgrad_border_kernel(ObservationBwdParams p, int n_border) {
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const U* __restrict__ C = static_cast<const U*>(p.C);
  T* __restrict__ dh = static_cast<T*>(p.dh);
  const int H = static_cast<int>(p.shape.height), W = static_cast<int>(p.shape.width);
  const int i = blockIdx.y * kBorderThreads + threadIdx.x;
  if (i >= n_border) return;
  const int64_t plane = blockIdx.x;
  int y, x;
  border_pixel(i, H, W, y, x);
  const int64_t area = static_cast<int64_t>(H) * W;
  const int64_t offset = plane * area;
  const U* __restrict__ C_plane = C + plane / p.shape.channels * area;
  const float* plane_taps = p.taps + (plane % p.shape.channels) * kFusionTaps;
  const float acc = fold_border(y, x, H, W, plane_taps, [dy, offset, C_plane](int pixel) {
    return to_float(dy[offset + pixel]) * to_float(C_plane[pixel]);
  });
  dh[offset + y * W + x] = from_float<T>(acc);
}

template <typename T, typename U>
cudaError_t launch_fwd(const ObservationFwdParams& p, cudaStream_t stream) {
  const int tiles_x = static_cast<int>((p.shape.width + kTile - 1) / kTile);
  const dim3 grid(static_cast<unsigned>(p.shape.batch * p.shape.channels), static_cast<unsigned>(fusion_tiles(p.shape)));
  fused_observation_fwd_kernel<T, U><<<grid, kThreads, 0, stream>>>(p, tiles_x);
  return cudaGetLastError();
}

template <typename T, typename U>
cudaError_t launch_bwd(const ObservationBwdParams& p, cudaStream_t stream) {
  const int tiles_x = static_cast<int>((p.shape.width + kTile - 1) / kTile);
  const int tiles = static_cast<int>(fusion_tiles(p.shape));
  const dim3 grid(static_cast<unsigned>(p.shape.batch * tiles), static_cast<unsigned>(p.channel_groups));
  fused_observation_bwd_tile_kernel<T, U><<<grid, kThreads, 0, stream>>>(p, tiles_x, tiles);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || p.dh == nullptr) return error;
  const int n_border = border_pixels(p.shape.height, p.shape.width);
  const unsigned planes = static_cast<unsigned>(p.shape.batch * p.shape.channels);
  const dim3 border_grid(planes, static_cast<unsigned>((n_border + kBorderThreads - 1) / kBorderThreads));
  fused_observation_dgrad_border_kernel<T, U><<<border_grid, kBorderThreads, 0, stream>>>(p, n_border);
  return cudaGetLastError();
}

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<element type of kind>{}).
template <typename F>
cudaError_t with_type(ScalarKind kind, F f) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return f(Type<__half>{});
    case ScalarKind::kBFloat16:
      return f(Type<__nv_bfloat16>{});
    default:
      return f(Type<float>{});
  }
}

}  // namespace

int64_t observation_channel_groups(const FusionShape& shape) {
  const int64_t blocks = shape.batch * fusion_tiles(shape);
  if (blocks <= 0 || shape.channels <= 0) return 1;
  const int64_t most = shape.channels / kMinGroupChannels > 1 ? shape.channels / kMinGroupChannels : 1;
  const int64_t wanted = (kTargetBlocks + blocks - 1) / blocks;
  const int64_t groups = wanted < most ? wanted : most;
  const int64_t per_group = (shape.channels + groups - 1) / groups;
  return (shape.channels + per_group - 1) / per_group;  // no empty group
}

cudaError_t launch_fused_observation_fwd(const ObservationFwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.channels * p.shape.height * p.shape.width == 0) return cudaSuccess;
  return with_type(p.kind, [&](auto t) {
    return with_type(p.u_kind, [&](auto u) {
      return launch_fwd<typename decltype(t)::type, typename decltype(u)::type>(p, stream);
    });
  });
}

cudaError_t launch_fused_observation_bwd(const ObservationBwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.channels * p.shape.height * p.shape.width == 0) return cudaSuccess;
  if (p.channel_groups < 1 || p.channel_groups > p.shape.channels) return cudaErrorInvalidValue;
  if (p.dh == nullptr && p.dtaps_partial == nullptr && p.dC_partial == nullptr && p.du == nullptr &&
      p.dD_partial == nullptr) {
    return cudaSuccess;
  }
  return with_type(p.kind, [&](auto t) {
    return with_type(p.u_kind, [&](auto u) {
      return launch_bwd<typename decltype(t)::type, typename decltype(u)::type>(p, stream);
    });
  });
}

}  // namespace spatial_mamba
