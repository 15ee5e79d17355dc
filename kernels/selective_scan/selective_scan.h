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

// Split rows. When batch * dim rows are too few to fill the GPU (detection sizes: batch 2, dim 128, 66,600 tokens),
// each row is cut into `segments` segments of scan_segment_length() positions (the last one ragged), scanned in
// parallel: a first pass computes each segment's composite map (its total decay and its end state from a zero
// start), a carry pass walks each row's maps in order (in reverse for the backward) to the state entering every
// segment, and the scan proper runs each segment from that state.
constexpr int kScanMaxSegments = 32;
constexpr int64_t kScanSegmentGranule = 256;  // segment lengths are whole steps of the kernels
constexpr int64_t kScanSplitMinSegment = 2048;
constexpr int64_t kScanSplitWarpsPerSm = 16;  // rows (warps) per SM below which rows are split

// Positions per segment (a multiple of kScanSegmentGranule) when rows of `length` are cut into `segments`.
__host__ __device__ inline int64_t scan_segment_length(int64_t length, int64_t segments) {
  const int64_t even = (length + segments - 1) / segments;
  return (even + kScanSegmentGranule - 1) / kScanSegmentGranule * kScanSegmentGranule;
}

// Whether `segments` segments of scan_segment_length() positions cover `length` with none empty.
inline bool scan_segments_valid(int64_t length, int64_t segments) {
  if (segments == 1) return true;
  if (segments < 1 || segments > kScanMaxSegments || length < 1) return false;
  const int64_t piece = scan_segment_length(length, segments);
  return (length + piece - 1) / piece == segments;
}

// Number of segments for batch * dim rows of `length` positions on a GPU with `sm_count` SMs: as many as keep the
// warps (rows x segments) within kScanSplitWarpsPerSm per SM, so that the split kernels run in one wave (the
// backward's split kernel fits 2 blocks of 8 warps per SM), each segment at least kScanSplitMinSegment long, at most
// kScanMaxSegments; 1 when that is 1. Always a valid count for `length` (scan_segments_valid).
inline int64_t scan_split_segments(int64_t batch, int64_t dim, int64_t length, int64_t sm_count) {
  const int64_t rows = batch * dim;
  const int64_t target = kScanSplitWarpsPerSm * sm_count;
  if (rows <= 0 || length <= 0 || rows >= target) return 1;
  int64_t segments = target / rows;
  segments = segments < length / kScanSplitMinSegment ? segments : length / kScanSplitMinSegment;
  segments = segments < kScanMaxSegments ? segments : kScanMaxSegments;
  if (segments <= 1) return 1;
  // Whole granules per segment can leave fewer, non-empty segments: count those.
  const int64_t piece = scan_segment_length(length, segments);
  return (length + piece - 1) / piece;
}

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
  int64_t segments = 1;  // per row; see scan_split_segments
  // Workspace of (batch * dim, segments, 2) floats when segments > 1: each segment's total decay and end state,
  // then (in the decay's place) the state entering it.
  float* segment_totals = nullptr;
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
  int64_t segments = 1;            // per row; see scan_split_segments
  float* segment_totals = nullptr;  // (batch * dim, segments, 2) workspace when segments > 1
  // Per-block partial sums, reduced by the binding (deterministic, no atomics):
  float* dB_partial = nullptr;           // (batch, scan_bwd_dim_groups(dim), length)
  float* dA_partial = nullptr;           // (segments, batch, dim)
  float* ddelta_bias_partial = nullptr;  // (segments, batch, dim)
};

// Number of channel groups the backward kernel sums dB over inside one block; dB_partial has this many slices.
int64_t scan_bwd_dim_groups(int64_t dim);

cudaError_t launch_selective_scan_fwd(const ScanFwdParams& params, cudaStream_t stream);
// The carry pass of split rows over a (rows, segments, 2) workspace of (total decay, end state) pairs: replaces
// each decay by the state entering its segment, composing the segments before it (after it when `reverse`).
cudaError_t launch_scan_segment_carries(float* segment_totals, int64_t rows, int64_t segments, bool reverse,
                                        cudaStream_t stream);
cudaError_t launch_selective_scan_bwd(const ScanBwdParams& params, cudaStream_t stream);

}  // namespace spatial_mamba
