// Element access shared by the CUDA kernels: every kernel computes in float32 and converts at load and store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "scalar_kind.h"

namespace spatial_mamba {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loads and stores for kernels whose element type is a run-time value (the branch is uniform across a launch).
__device__ __forceinline__ float load_as_float(const void* base, int64_t index, ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return __half2float(static_cast<const __half*>(base)[index]);
    case ScalarKind::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    default:
      return static_cast<const float*>(base)[index];
  }
}

__device__ __forceinline__ void store_from_float(void* base, int64_t index, float value, ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat16:
      static_cast<__half*>(base)[index] = __float2half_rn(value);
      break;
    case ScalarKind::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
      break;
    default:
      static_cast<float*>(base)[index] = value;
  }
}

// An aligned register type of kBytes bytes, for vectorised global loads and stores.
template <int kBytes>
struct VecOf;
template <>
struct VecOf<4> {
  using type = uint32_t;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<16> {
  using type = uint4;
};

// Loads N consecutive elements starting at p into floats, in 16-byte (or smaller) vectors.
// p must be aligned to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vector(const T* p, float (&out)[N]) {
  constexpr int kBytes = N * sizeof(T) < 16 ? N * static_cast<int>(sizeof(T)) : 16;
  constexpr int kPer = kBytes / sizeof(T);
  using V = typename VecOf<kBytes>::type;
  static_assert(N % kPer == 0, "N must fill whole vectors");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    union {
      V vec;
      T elems[kPer];
    } chunk;
    chunk.vec = reinterpret_cast<const V*>(p)[c];
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[c * kPer + j] = to_float(chunk.elems[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* p, const float (&in)[N]) {
  constexpr int kBytes = N * sizeof(T) < 16 ? N * static_cast<int>(sizeof(T)) : 16;
  constexpr int kPer = kBytes / sizeof(T);
  using V = typename VecOf<kBytes>::type;
  static_assert(N % kPer == 0, "N must fill whole vectors");
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    union {
      V vec;
      T elems[kPer];
    } chunk;
#pragma unroll
    for (int j = 0; j < kPer; ++j) chunk.elems[j] = from_float<T>(in[c * kPer + j]);
    reinterpret_cast<V*>(p)[c] = chunk.vec;
  }
}

}  // namespace spatial_mamba
