// Forward selective scan, N = 1 (see selective_scan.h).
//
// One warp scans one row (b, d). The row is walked in steps of 32 * kItems positions; in a step each lane loads
// kItems consecutive positions with vector loads, folds them into one affine map (x -> a x + b), the warp scans
// the 32 maps with shuffles, and each lane replays its items from its entry state. The state at the end of a step
// is the carry into the next one. All arithmetic is float32; hs is written as float32.
// Split rows (p.segments > 1, see selective_scan.h): one warp per (row, segment). A first kernel stores each
// segment's composite map, the carry pass turns them into each segment's entry state, and the scan kernel scans
// its segment from there as above.
#include "scan_common.cuh"
#include "selective_scan.h"

namespace spatial_mamba {
namespace {

constexpr int kFwdWarps = 8;

// The affine map of one lane's kItems positions starting at `start` (positions from `end` on are the identity);
// `step` gets each position's map.
template <typename T, int kItems, bool kVec>
__device__ __forceinline__ scan::Affine lane_maps(const T* u, const T* delta, const T* B, int start, int end,
                                                  float A_log2, float bias, bool softplus_on,
                                                  scan::Affine (&step)[kItems]) {
  using namespace scan;
  float u_v[kItems], delta_v[kItems], B_v[kItems];
  load_items<T, kItems, kVec>(u, start, end, u_v);
  load_items<T, kItems, kVec>(delta, start, end, delta_v);
  load_items<T, kItems, kVec>(B, start, end, B_v);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const float v = delta_v[i] + bias;
    const float dt = softplus_on ? softplus(v) : v;
    // Past the end of the segment the map is the identity, so it does not disturb the scan.
    step[i] = start + i < end ? Affine{exp2f(dt * A_log2), dt * B_v[i] * u_v[i]} : Affine{1.f, 0.f};
  }
  Affine lane_map = step[0];
#pragma unroll
  for (int i = 1; i < kItems; ++i) lane_map = then(lane_map, step[i]);
  return lane_map;
}

// Pointers and constants of one row (b, d).
template <typename T>
struct FwdRow {
  const T* u;
  const T* delta;
  const T* B;
  float A_log2;  // exp(Δ A) = exp2(Δ A log2 e)
  float bias;
  int64_t row;
};

template <typename T>
__device__ __forceinline__ FwdRow<T> fwd_row(const ScanFwdParams& p, int64_t row) {
  const int64_t length = p.shape.length;
  const int64_t b = row / p.shape.dim;
  const int64_t d = row % p.shape.dim;
  return {static_cast<const T*>(p.u) + row * length,
          static_cast<const T*>(p.delta) + row * length,
          static_cast<const T*>(p.B) + b * length,
          p.A[d] * scan::kLog2e,
          p.delta_bias != nullptr ? p.delta_bias[d] : 0.f,
          row};
}

// Split rows, first pass: the composite map (total decay, end state from a zero start) of segment blockIdx.y of
// each row, into segment_totals. The last segment's map is never needed, so blockIdx.y runs over the others.
template <typename T, int kItems, bool kVec>
__global__ void __launch_bounds__(kFwdWarps * 32) selective_scan_fwd_totals_kernel(ScanFwdParams p) {
  using namespace scan;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + (threadIdx.x >> 5);
  if (row >= p.shape.batch * p.shape.dim) return;  // uniform across the warp; no block-wide barrier
  const FwdRow<T> r = fwd_row<T>(p, row);
  const int segment = static_cast<int>(blockIdx.y);
  const Segment seg = row_segment(static_cast<int>(p.shape.length), p.segments, segment);

  constexpr int kStep = 32 * kItems;
  Affine total = {1.f, 0.f};
  for (int base = seg.begin; base < seg.end; base += kStep) {
    Affine step[kItems];
    const Affine lane_map =
        lane_maps<T, kItems, kVec>(r.u, r.delta, r.B, base + lane * kItems, seg.end, r.A_log2, r.bias,
                                   p.delta_softplus, step);
    const Affine inclusive = warp_scan_forward(lane_map, lane);
    total = then(total, {__shfl_sync(kFullMask, inclusive.a, 31), __shfl_sync(kFullMask, inclusive.b, 31)});
  }
  if (lane == 0) {
    float* out = p.segment_totals + (row * p.segments + segment) * 2;
    out[0] = total.a;
    out[1] = total.b;
  }
}

// The scan itself: segment blockIdx.y of each row from the state that the segments before it leave (kSplit), or
// whole rows, which keeps the common case's registers.
template <typename T, int kItems, bool kVec, bool kSplit>
__global__ void __launch_bounds__(kFwdWarps * 32) selective_scan_fwd_kernel(ScanFwdParams p) {
  using namespace scan;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + (threadIdx.x >> 5);
  if (row >= p.shape.batch * p.shape.dim) return;  // uniform across the warp; the kernel has no block-wide barrier
  const int length = static_cast<int>(p.shape.length);  // at most kScanMaxLength (checked at launch)
  const FwdRow<T> r = fwd_row<T>(p, row);
  float* hs = p.hs + row * length;
  const int segment = kSplit ? static_cast<int>(blockIdx.y) : 0;
  const Segment seg = kSplit ? row_segment(length, p.segments, segment) : Segment{0, length};

  constexpr int kStep = 32 * kItems;
  // The state entering the segment, from the carry pass.
  float carry = kSplit && segment > 0 ? p.segment_totals[(row * p.segments + segment) * 2] : 0.f;
  for (int base = seg.begin; base < seg.end; base += kStep) {
    const int start = base + lane * kItems;
    Affine step[kItems];
    const Affine lane_map =
        lane_maps<T, kItems, kVec>(r.u, r.delta, r.B, start, seg.end, r.A_log2, r.bias, p.delta_softplus, step);

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
    store_items<float, kItems, kVec>(hs, start, seg.end, out);

    const Affine whole = {__shfl_sync(kFullMask, inclusive.a, 31), __shfl_sync(kFullMask, inclusive.b, 31)};
    carry = fmaf(whole.a, carry, whole.b);
  }
}

// The carry pass: one thread per row walks its segments in order (in reverse for the backward), S <= 32 steps.
__global__ void __launch_bounds__(256) scan_segment_carry_kernel(float* totals, int64_t rows, int segments,
                                                                 bool reverse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float* pair = totals + row * segments * 2;
  float state = 0.f;
  for (int i = 0; i < segments; ++i) {
    const int j = reverse ? segments - 1 - i : i;
    // The map of the last segment walked was not computed (nor needed): it is not read, so that compute-sanitizer's
    // initcheck sees no read of uninitialised workspace.
    if (i + 1 < segments) {
      const float decay = pair[2 * j];
      pair[2 * j] = state;
      state = fmaf(decay, state, pair[2 * j + 1]);
    } else {
      pair[2 * j] = state;
    }
  }
}

template <typename T>
cudaError_t launch_typed(const ScanFwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.shape.batch * p.shape.dim;
  const unsigned row_blocks = static_cast<unsigned>((rows + kFwdWarps - 1) / kFwdWarps);
  return scan::dispatch_items(p.shape.length, [&](auto items) {
    constexpr int kItems = decltype(items)::value;
    const bool vec = p.shape.length % kItems == 0 && scan::aligned16(p.u) && scan::aligned16(p.delta) &&
                     scan::aligned16(p.B) && scan::aligned16(p.hs);
    const dim3 grid(row_blocks, static_cast<unsigned>(p.segments));
    if constexpr (kItems == scan::kSplitItems) {
      // Split rows are at least two segments of kScanSplitMinSegment (or whole granules) long.
      if (p.segments > 1) {
        const dim3 totals_grid(row_blocks, static_cast<unsigned>(p.segments - 1));
        if (vec) {
          selective_scan_fwd_totals_kernel<T, kItems, true><<<totals_grid, kFwdWarps * 32, 0, stream>>>(p);
        } else {
          selective_scan_fwd_totals_kernel<T, kItems, false><<<totals_grid, kFwdWarps * 32, 0, stream>>>(p);
        }
        const cudaError_t error = launch_scan_segment_carries(p.segment_totals, rows, p.segments, false, stream);
        if (error != cudaSuccess) return error;
        if (vec) {
          selective_scan_fwd_kernel<T, kItems, true, true><<<grid, kFwdWarps * 32, 0, stream>>>(p);
        } else {
          selective_scan_fwd_kernel<T, kItems, false, true><<<grid, kFwdWarps * 32, 0, stream>>>(p);
        }
        return cudaGetLastError();
      }
    }
    if (vec) {
      selective_scan_fwd_kernel<T, kItems, true, false><<<grid, kFwdWarps * 32, 0, stream>>>(p);
    } else {
      selective_scan_fwd_kernel<T, kItems, false, false><<<grid, kFwdWarps * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_scan_segment_carries(float* segment_totals, int64_t rows, int64_t segments, bool reverse,
                                        cudaStream_t stream) {
  if (rows == 0 || segments <= 1) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((rows + 255) / 256));
  scan_segment_carry_kernel<<<grid, 256, 0, stream>>>(segment_totals, rows, static_cast<int>(segments), reverse);
  return cudaGetLastError();
}

cudaError_t launch_selective_scan_fwd(const ScanFwdParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.dim == 0 || p.shape.length == 0) return cudaSuccess;
  if (!scan_segments_valid(p.shape.length, p.segments) || (p.segments > 1 && p.segment_totals == nullptr)) {
    return cudaErrorInvalidValue;
  }
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
