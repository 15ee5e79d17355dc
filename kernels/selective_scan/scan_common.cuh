// Pieces shared by the forward and backward scan kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/float_io.cuh"
#include "selective_scan.h"

namespace spatial_mamba {
namespace scan {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
// The official softplus switches to the identity above this value (the official
// kernels/selective_scan/ softplus, and F.softplus), so must we.
constexpr float kSoftplusThreshold = 20.f;


// The affine map x -> a x + b; a scan of the recurrence x_t = a_t x_{t-1} + b_t composes these maps.
struct Affine {
  float a;
  float b;
};

// Applies `first`, then `second`.
__device__ __forceinline__ Affine then(Affine first, Affine second) {
  return {first.a * second.a, fmaf(second.a, first.b, second.b)};
}

// Inclusive scan across the warp in lane order: lane i gets map_0, then map_1, ..., then map_i.
__device__ __forceinline__ Affine warp_scan_forward(Affine v, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const Affine earlier = {__shfl_up_sync(kFullMask, v.a, offset), __shfl_up_sync(kFullMask, v.b, offset)};
    if (lane >= offset) v = then(earlier, v);
  }
  return v;
}

// Inclusive scan across the warp in reverse lane order: lane i gets map_31, then map_30, ..., then map_i.
__device__ __forceinline__ Affine warp_scan_reverse(Affine v, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const Affine later = {__shfl_down_sync(kFullMask, v.a, offset), __shfl_down_sync(kFullMask, v.b, offset)};
    if (lane + offset < 32) v = then(later, v);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) in (0, 1], and log1p(e) = 2 atanh(s) with s = e / (2 + e) in
// (0, 1/3]: 2 s (1 + s^2/3 + s^4/5 + ... + s^14/15), whose first omitted term is below 2**-24 of the sum. No log and
// no branch: about 20 instructions against about 30 for log1pf(expf(v)). exp and the division are the only
// approximate steps (relative error about 2**-21 each under --use_fast_math), so the result keeps float32 accuracy
// for every v, also where e is tiny (where a fast log of 1 + e would lose it).
__device__ __forceinline__ float softplus(float v) {
  const float e = expf(-fabsf(v));
  const float s = __fdividef(e, 2.f + e);
  const float s2 = s * s;
  float series = 1.f / 15.f;
  series = fmaf(series, s2, 1.f / 13.f);
  series = fmaf(series, s2, 1.f / 11.f);
  series = fmaf(series, s2, 1.f / 9.f);
  series = fmaf(series, s2, 1.f / 7.f);
  series = fmaf(series, s2, 1.f / 5.f);
  series = fmaf(series, s2, 1.f / 3.f);
  series = fmaf(series, s2, 1.f);
  const float log1p_e = 2.f * s * series;
  return v <= kSoftplusThreshold ? fmaxf(v, 0.f) + log1p_e : v;
}

// d softplus / dv = sigmoid(v) below the threshold, 1 above it.
__device__ __forceinline__ float softplus_grad(float v) {
  return v <= kSoftplusThreshold ? 1.f / (1.f + expf(-v)) : 1.f;
}

// Loads the kItems consecutive elements of one lane starting at `start`; positions from `length` on read 0.
// kVec: the host checked that rows start on vector boundaries and length % kItems == 0, so a lane's items are all
// inside the row or all outside it.
// Positions inside a row are 32-bit (kScanMaxLength); the row's base pointer carries the 64-bit offset.
template <typename T, int kItems, bool kVec>
__device__ __forceinline__ void load_items(const T* row, int start, int length, float (&out)[kItems]) {
  if constexpr (kVec) {
    if (start < length) {
      load_vector<T, kItems>(row + start, out);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) out[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = start + i < length ? to_float(row[start + i]) : 0.f;
  }
}

template <typename T, int kItems, bool kVec>
__device__ __forceinline__ void store_items(T* row, int start, int length, const float (&in)[kItems]) {
  if constexpr (kVec) {
    if (start < length) store_vector<T, kItems>(row + start, in);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (start + i < length) row[start + i] = from_float<T>(in[i]);
    }
  }
}

// Items per lane: a warp covers 32 * kItems positions per step, so short rows use short steps.
// Split rows (segments > 1) are longer than one granule of kScanSegmentGranule positions, so they always get 8.
constexpr int kSplitItems = 8;
static_assert(kScanSegmentGranule % (32 * kSplitItems) == 0, "segments must be whole steps");

template <typename F>
cudaError_t dispatch_items(int64_t length, F&& launch) {
  if (length > kScanMaxLength) return cudaErrorInvalidValue;  // the binding rejects such rows with a clear message
  if (length <= 64) return launch(std::integral_constant<int, 2>{});
  return launch(std::integral_constant<int, kSplitItems>{});
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The positions [begin, end) of segment `segment` of a row (end - begin = scan_segment_length, the last one ragged).
struct Segment {
  int begin;
  int end;
};

__device__ __forceinline__ Segment row_segment(int length, int64_t segments, int segment) {
  if (segments == 1) return {0, length};
  const int piece = static_cast<int>(scan_segment_length(length, segments));
  const int begin = segment * piece;
  return {begin, min(begin + piece, length)};
}

}  // namespace scan
}  // namespace spatial_mamba
