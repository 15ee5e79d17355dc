// One-pass state fusion: 25 taps with a halo of 5 and replicate borders; the interface between the torch binding
// (state_fusion.cpp) and the kernels (state_fusion_kernels.cu).
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

}  // namespace spatial_mamba
