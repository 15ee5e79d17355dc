// One-pass state fusion: 25 taps with a halo of 5 and replicate borders, alone and fused with the observation step
// that follows it; the interface between the torch binding (state_fusion.cpp) and the kernels
// (state_fusion_kernels.cu, observation_kernels.cu).
//
// For every plane (b, c) of h (batch, channels, H, W) and the taps (channels, 25) float32:
//   out[y, x] = Σ_k taps[c, k] h[clamp(y + dy_k, 0, H - 1), clamp(x + dx_k, 0, W - 1)]
// with the 25 distinct offsets of the three dilated 3x3 kernels of the structure-aware state fusion (paper Eq. 4):
// (0, 0) first, then for d = 1, 3, 5 the eight (d i, d j), i, j in {-1, 0, 1}, (i, j) != (0, 0), in row order. The
// three dilated convolutions of training and the merged 11x11 kernel of evaluation are both this one function.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace spatial_mamba {

constexpr int kFusionTaps = 25;
constexpr int kFusionHalo = 5;

// Offsets of tap k (compile-time constants in unrolled loops).
__host__ __device__ constexpr int fusion_tap_dy(int k) {
  return k == 0 ? 0 : (1 + 2 * ((k - 1) / 8)) * (((k - 1) % 8 + ((k - 1) % 8) / 4) / 3 - 1);
}
__host__ __device__ constexpr int fusion_tap_dx(int k) {
  return k == 0 ? 0 : (1 + 2 * ((k - 1) / 8)) * (((k - 1) % 8 + ((k - 1) % 8) / 4) % 3 - 1);
}

struct FusionShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
};

struct FusionFwdParams {
  FusionShape shape;
  ScalarKind kind = ScalarKind::kFloat32;  // dtype of h and out
  const void* h = nullptr;                 // (batch, channels, H, W)
  const float* taps = nullptr;             // (channels, 25)
  void* out = nullptr;                     // (batch, channels, H, W)
};

struct FusionBwdParams {
  FusionShape shape;
  ScalarKind kind = ScalarKind::kFloat32;  // dtype of h, dy and dh
  const void* h = nullptr;
  const float* taps = nullptr;
  const void* dy = nullptr;
  void* dh = nullptr;                // (batch, channels, H, W), or nullptr: no input gradient
  float* dtaps_partial = nullptr;    // (batch * channels, fusion_tiles(shape), 25), or nullptr: no tap gradient
};

// The number of output tiles of one plane (a grid dimension: the binding checks it is at most 65535).
int64_t fusion_tiles(const FusionShape& shape);

cudaError_t launch_state_fusion_fwd(const FusionFwdParams& params, cudaStream_t stream);
// The tile kernel (tap gradients; dh off the border), then, when dh is asked for, the border kernel (dh on the
// first and last rows and columns, where replicate padding folds several outputs onto one pixel).
cudaError_t launch_state_fusion_bwd(const FusionBwdParams& params, cudaStream_t stream);

// Fused observation (the paper's observation equation with d_state N = 1, after the state fusion): for every plane
// (b, c),
//   y[b, c, y, x] = F(h)[b, c, y, x] C[b, y, x] + D[c] u[b, c, y, x]
// with F the fusion above. h and y in one dtype T; C (batch, H, W) and u (batch, channels, H, W) in one dtype U
// (either may be any of the three); taps (channels, 25) and D (channels,) float32; all arithmetic fp32.
struct ObservationFwdParams {
  FusionShape shape;
  ScalarKind kind = ScalarKind::kFloat32;    // dtype of h and y
  ScalarKind u_kind = ScalarKind::kFloat32;  // dtype of C and u
  const void* h = nullptr;
  const float* taps = nullptr;
  const void* C = nullptr;
  const void* u = nullptr;
  const float* D = nullptr;
  void* y = nullptr;
};

// Backward from dy (T). With dF = dy C:
//   dh = the adjoint of F applied to dF (T), dtaps[c, k] = Σ_{b,y,x} dF h[shifted by tap k, clamped],
//   dC[b, y, x] = Σ_c dy F(h) (U), du = dy D[c] (U), dD[c] = Σ_{b,y,x} dy u.
// The tile kernel's grid is (batch x tiles, channel_groups); a block walks the channels of its group (consecutive
// runs of ceil(channels / channel_groups)). Each output pointer may be nullptr: that gradient is not computed.
struct ObservationBwdParams {
  FusionShape shape;
  ScalarKind kind = ScalarKind::kFloat32;    // dtype of h, dy and dh
  ScalarKind u_kind = ScalarKind::kFloat32;  // dtype of C, u, dC and du
  int64_t channel_groups = 1;                // 1 <= channel_groups <= channels
  const void* h = nullptr;
  const float* taps = nullptr;
  const void* C = nullptr;
  const void* u = nullptr;
  const float* D = nullptr;
  const void* dy = nullptr;
  void* dh = nullptr;                // (batch, channels, H, W)
  float* dtaps_partial = nullptr;    // (batch, channels, fusion_tiles(shape), 25): summed over dims 0 and 2
  float* dC_partial = nullptr;       // (channel_groups, batch, H, W): summed over dim 0
  void* du = nullptr;                // (batch, channels, H, W)
  float* dD_partial = nullptr;       // (batch, channels, fusion_tiles(shape)): summed over dims 0 and 2
};

// The channel groups of the backward: enough blocks (batch x tiles per group) to fill a large GPU several times over,
// but no fewer than 8 channels per group where the channels allow it (each group writes a dC partial).
int64_t observation_channel_groups(const FusionShape& shape);

// The forward grid is the fusion's: (batch x channels, tiles).
cudaError_t launch_fused_observation_fwd(const ObservationFwdParams& params, cudaStream_t stream);
// The tile kernel (every gradient; dh off the border), then, when dh is asked for, the border kernel (dh on the first
// and last rows and columns, folding dF as the fusion's border kernel folds dy). Returns cudaErrorInvalidValue for
// a channel group count outside [1, channels].
cudaError_t launch_fused_observation_bwd(const ObservationBwdParams& params, cudaStream_t stream);

}  // namespace spatial_mamba
