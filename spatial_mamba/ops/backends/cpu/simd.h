// Vector helpers shared by state_fusion.cpp and selective_scan.cpp (GCC vector types of floats).
#pragma once

#include <cstdint>
#include <cstring>

// Floats per vector: 16 where the CPU has 512-bit registers (AVX-512), else 8. Vectors wider than the registers are
// split by the compiler, which lowers some of their operations (selects, conversions) to scalar code: with 16 floats
// on an AVX2 CPU these kernels ran 3 to 5 times slower.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

// The first n floats at p, n at most the lanes of V (zeros in the other lanes), and their store.
template <class V>
inline V load_n(const float* p, int64_t n) {
  V v = V{};
  if (n == int64_t(sizeof(V) / sizeof(float))) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  }
  return v;
}

template <class V>
inline void store_n(float* p, V v, int64_t n) {
  if (n == int64_t(sizeof(V) / sizeof(float))) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = v[i];
  }
}
