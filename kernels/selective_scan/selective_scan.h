// Hidden-state selective scan for d_state N = 1 (paper Eq. 2-3; the official
// kernels/selective_scan/): the interface between the torch binding (selective_scan.cpp) and the kernels
// (selective_scan_fwd.cu, selective_scan_bwd.cu).
//
// For each row (b, d) of length L:  Δ_t = softplus(delta_t + bias_d) (or delta_t + bias_d),
//   x_t = exp(Δ_t A_d) x_{t-1} + Δ_t B_{b,t} u_t,  x_{-1} = 0,  and hs_t = x_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/scalar_kind.h"

namespace spatial_mamba {

// Longest row the kernels take: positions inside a row are 32-bit (cheaper than 64-bit index math on every item),
// with room for one step past the end; the row's start is a 64-bit offset, so batch * dim * length may exceed 2**31.
constexpr int64_t kScanMaxLength = (int64_t{1} << 31) - 4096;

struct ScanShape {
  int64_t batch = 0;
  int64_t dim = 0;
  int64_t length = 0;
};

struct ScanFwdParams {
  ScanShape shape;
  ScalarKind kind = ScalarKind::kFloat32;  // dtype of u, delta and B
  const void* u = nullptr;                 // (batch, dim, length)
  const void* delta = nullptr;             // (batch, dim, length)
  const float* A = nullptr;                // (dim,)
  const void* B = nullptr;                 // (batch, length)
  const float* delta_bias = nullptr;       // (dim,) or nullptr
  bool delta_softplus = false;
  float* hs = nullptr;  // (batch, dim, length)
};

struct ScanBwdParams {
  ScanShape shape;
  ScalarKind kind = ScalarKind::kFloat32;
  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const float* delta_bias = nullptr;
  bool delta_softplus = false;
  const float* hs = nullptr;   // the forward output: x_{t-1} is read from it instead of being recomputed
  const float* dhs = nullptr;  // (batch, dim, length)
  void* du = nullptr;          // (batch, dim, length), dtype of u
  void* ddelta = nullptr;      // (batch, dim, length), dtype of delta
  // Per-block partial sums, reduced by the binding (deterministic, no atomics):
  float* dB_partial = nullptr;           // (batch, scan_bwd_dim_groups(dim), length)
  float* dA_partial = nullptr;           // (batch, dim)
  float* ddelta_bias_partial = nullptr;  // (batch, dim)
};

// Number of channel groups the backward kernel sums dB over inside one block; dB_partial has this many slices.
int64_t scan_bwd_dim_groups(int64_t dim);

cudaError_t launch_selective_scan_fwd(const ScanFwdParams& params, cudaStream_t stream);
cudaError_t launch_selective_scan_bwd(const ScanBwdParams& params, cudaStream_t stream);

}  // namespace spatial_mamba
