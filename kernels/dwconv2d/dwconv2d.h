// Depthwise 2-D cross-correlation with replicate padding (paper Eq. 4; the official kernels/dwconv2d/): the
// interface between the torch binding (dwconv2d.cpp) and the kernels (dwconv2d_fwd.cu, dwconv2d_wgrad.cu).
//
// For every plane (b, c) of x (batch, channels, H, W), odd kernel size K, dilation D and r = K / 2:
//   y[i, j] = Σ_{p, q} w[c, p, q] x[clamp(i + D (p - r), 0, H - 1), clamp(j + D (q - r), 0, W - 1)]
// which is F.conv2d(F.pad(x, D r on every side, mode="replicate"), w, dilation=D, groups=channels).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace spatial_mamba {

// Kernel sizes with compiled kernels; the binding rejects the others.
constexpr int kDwconvMinKernel = 3;
constexpr int kDwconvMaxKernel = 11;

struct DwconvShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int kernel_size = 3;
  int dilation = 1;
};

struct DwconvParams {
  DwconvShape shape;
  ScalarKind kind = ScalarKind::kFloat32;  // dtype of src and dst
  const void* src = nullptr;               // forward: x; input gradient: dy   (batch, channels, H, W)
  const float* weight = nullptr;           // (channels, K, K) float32
  void* dst = nullptr;                     // forward: y; input gradient: dx   (batch, channels, H, W)
};

struct DwconvWgradParams {
  DwconvShape shape;
  ScalarKind kind = ScalarKind::kFloat32;  // dtype of x and dy
  const void* x = nullptr;
  const void* dy = nullptr;
  float* dw_partial = nullptr;  // (dwconv2d_wgrad_partials(shape), channels, K, K), summed by the binding
};

// Limits the binding checks before launching: the shared memory one block needs (it grows with the dilation) against
// the most the current device allows, and the number of spatial tiles (a grid dimension, at most 65535).
int64_t dwconv2d_shared_bytes(const DwconvShape& shape);
cudaError_t dwconv2d_max_shared_bytes(int64_t* bytes);
int64_t dwconv2d_spatial_tiles(const DwconvShape& shape);

int64_t dwconv2d_wgrad_partials(const DwconvShape& shape);

cudaError_t launch_dwconv2d_fwd(const DwconvParams& params, cudaStream_t stream);
cudaError_t launch_dwconv2d_dgrad(const DwconvParams& params, cudaStream_t stream);
cudaError_t launch_dwconv2d_wgrad(const DwconvWgradParams& params, cudaStream_t stream);

}  // namespace spatial_mamba
