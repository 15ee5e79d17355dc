// Forward selective scan, N = 1 (see selective_scan.h).
//
// One warp scans one row (b, d). The row is walked in steps of 32 * kItems positions; in a step each lane loads
// kItems consecutive positions with vector loads, folds them into one affine map (x -> a x + b), the warp scans
// the 32 maps with shuffles, and each lane replays its items from its entry state. The state at the end of a step
// is the carry into the next one. All arithmetic is float32; hs is written as float32.
#include "scan_common.cuh"
#include "selective_scan.h"

namespace spatial_mamba {
namespace {

constexpr int kFwdWarps = 8;

template <typename T, int kItems, bool kVec>
__global__ void __launch_bounds__(kFwdWarps * 32) selective_scan_fwd_kernel(ScanFwdParams p) {
  using namespace scan;
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.shape.batch * p.shape.dim;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // uniform across the warp; the kernel has no block-wide barrier
  const int length = static_cast<int>(p.shape.length);  // at most kScanMaxLength (checked at launch)
  const int64_t b = row / p.shape.dim;
  const int64_t d = row % p.shape.dim;

  const T* u = static_cast<const T*>(p.u) + row * length;
  const T* delta = static_cast<const T*>(p.delta) + row * length;
  const T* B = static_cast<const T*>(p.B) + b * length;
  float* hs = p.hs + row * length;
  // exp(Δ A) = exp2(Δ A log2 e)
  const float A_log2 = p.A[d] * kLog2e;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;

  constexpr int kStep = 32 * kItems;
  float carry = 0.f;
  for (int base = 0; base < length; base += kStep) {
    const int start = base + lane * kItems;
    float u_v[kItems], delta_v[kItems], B_v[kItems];
    load_items<T, kItems, kVec>(u, start, length, u_v);
    load_items<T, kItems, kVec>(delta, start, length, delta_v);
    load_items<T, kItems, kVec>(B, start, length, B_v);

    Affine step[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float v = delta_v[i] + bias;
      const float dt = p.delta_softplus ? softplus(v) : v;
      // Past the end of the row the map is the identity, so it does not disturb the scan.
      step[i] = start + i < length ? Affine{exp2f(dt * A_log2), dt * B_v[i] * u_v[i]} : Affine{1.f, 0.f};
    }
    Affine lane_map = step[0];
#pragma unroll
    for (int i = 1; i < kItems; ++i) lane_map = then(lane_map, step[i]);

    const Affine inclusive = warp_scan_forward(lane_map, lane);
    Affine before = {__shfl_up_sync(kFullMask, inclusive.a, 1), __shfl_up_sync(kFullMask, inclusive.b, 1)};
    if (lane == 0) before = {1.f, 0.f};

    float x = fmaf(before.a, carry, before.b);
    float out[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      x = fmaf(step[i].a, x, step[i].b);
      out[i] = x;
    }
    store_items<float, kItems, kVec>(hs, start, length, out);

    const Affine whole = {__shfl_sync(kFullMask, inclusive.a, 31), __shfl_sync(kFullMask, inclusive.b, 31)};
    carry = fmaf(whole.a, carry, whole.b);
  }
}

template <typename T>
cudaError_t launch_typed(const ScanFwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.shape.batch * p.shape.dim;
  const dim3 grid(static_cast<unsigned>((rows + kFwdWarps - 1) / kFwdWarps));
  return scan::dispatch_items(p.shape.length, [&](auto items) {
    constexpr int kItems = decltype(items)::value;
    const bool vec = p.shape.length % kItems == 0 && scan::aligned16(p.u) && scan::aligned16(p.delta) &&
                     scan::aligned16(p.B) && scan::aligned16(p.hs);
    if (vec) {
      selective_scan_fwd_kernel<T, kItems, true><<<grid, kFwdWarps * 32, 0, stream>>>(p);
    } else {
      selective_scan_fwd_kernel<T, kItems, false><<<grid, kFwdWarps * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_selective_scan_fwd(const ScanFwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.dim == 0 || p.shape.length == 0) return cudaSuccess;
  switch (p.kind) {
    case ScalarKind::kFloat16:
      return launch_typed<__half>(p, stream);
    case ScalarKind::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    default:
      return launch_typed<float>(p, stream);
  }
}

}  // namespace spatial_mamba
