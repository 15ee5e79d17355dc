// Backward selective scan, N = 1 (see selective_scan.h).
//
// With g_t = dL/dx_t (all paths), the adjoint runs right to left: g_t = dhs_t + a_{t+1} g_{t+1}, a_t = exp(Δ_t A).
// Writing h_t = a_t g_t (what flows from step t into x_{t-1}) gives the affine recurrence
// h_t = a_t h_{t+1} + a_t dhs_t, scanned like the forward (per-lane fold, warp shuffle scan, carry across steps)
// but walking the row from its end. With x_{t-1} read from the saved forward output:
//   du_t = g_t Δ_t B_t,   dB_t = Σ_d g_t Δ_t u_t,   dΔ_t = g_t (B_t u_t + A a_t x_{t-1}),
//   dA = Σ_t g_t a_t x_{t-1} Δ_t,
//   ddelta_t = dΔ_t softplus'(delta_t + bias) (or dΔ_t without softplus),  ddelta_bias = Σ_t ddelta_t.
// A block holds kBwdWarps warps that scan kBwdWarps channels of one batch element in lock step, so dB is first
// summed over those channels in shared memory. The remaining sums (over channel groups for dB, over the batch for
// dA and ddelta_bias) are partial outputs that the binding reduces: deterministic, and no atomics.
// Split rows (p.segments > 1, see selective_scan.h): blocks are (channel group, segment); a first kernel stores
// each segment's composite adjoint map (from its end to its start), the carry pass (selective_scan_fwd.cu) walks
// them from the last segment to the h entering each segment from its right, and the main kernel scans its segment
// from there. dA and ddelta_bias get one partial per segment.
#include "scan_common.cuh"
#include "selective_scan.h"

namespace spatial_mamba {
namespace {

constexpr int kBwdWarps = 8;

// The adjoint maps h -> a_t h + a_t dhs_t of one lane's kItems positions starting at `start`, folded from the last
// (positions from `end` on are the identity: dhs reads 0 there and a_t is set to 1); raw, dt and decay get each
// position's delta + bias, Δ and a_t.
template <int kItems>
__device__ __forceinline__ scan::Affine adjoint_lane_map(const float (&delta_v)[kItems], const float (&dhs_v)[kItems],
                                                         int start, int end, float A_log2, float bias,
                                                         bool softplus_on, float (&raw)[kItems], float (&dt)[kItems],
                                                         float (&decay)[kItems]) {
  using namespace scan;
  Affine lane_map = {1.f, 0.f};
#pragma unroll
  for (int i = kItems - 1; i >= 0; --i) {
    raw[i] = delta_v[i] + bias;
    dt[i] = softplus_on ? softplus(raw[i]) : raw[i];
    decay[i] = start + i < end ? exp2f(dt[i] * A_log2) : 1.f;
    lane_map = then(lane_map, Affine{decay[i], decay[i] * dhs_v[i]});
  }
  return lane_map;
}

// Split rows, first pass: the composite map of segment blockIdx.y + 1 of each row for h_t = a_t h_{t+1} +
// a_t dhs_t, taken from the segment's end to its start (total decay, h at its start from a zero h past its end),
// into segment_totals. The first segment's map is never needed. One warp per row, as in the forward.
template <typename T, int kItems, bool kVec>
__global__ void __launch_bounds__(kBwdWarps * 32) selective_scan_bwd_totals_kernel(ScanBwdParams p) {
  using namespace scan;
  constexpr int kStep = 32 * kItems;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kBwdWarps + (threadIdx.x >> 5);
  if (row >= p.shape.batch * p.shape.dim) return;  // uniform across the warp; no block-wide barrier
  const int length = static_cast<int>(p.shape.length);
  const int64_t d = row % p.shape.dim;
  const T* delta = static_cast<const T*>(p.delta) + row * length;
  const float* dhs = p.dhs + row * length;
  const float A_log2 = p.A[d] * kLog2e;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;
  const int segment = static_cast<int>(blockIdx.y) + 1;
  const Segment seg = row_segment(length, p.segments, segment);

  Affine total = {1.f, 0.f};  // maps h past the segment's end to h at the start of the steps done so far
  const int steps = (seg.end - seg.begin + kStep - 1) / kStep;
  for (int s = steps - 1; s >= 0; --s) {
    const int start = seg.begin + s * kStep + lane * kItems;
    float delta_v[kItems], dhs_v[kItems], raw[kItems], dt[kItems], decay[kItems];
    load_items<T, kItems, kVec>(delta, start, seg.end, delta_v);
    load_items<float, kItems, kVec>(dhs, start, seg.end, dhs_v);
    const Affine lane_map =
        adjoint_lane_map(delta_v, dhs_v, start, seg.end, A_log2, bias, p.delta_softplus, raw, dt, decay);
    const Affine inclusive = warp_scan_reverse(lane_map, lane);
    total = then(total, {__shfl_sync(kFullMask, inclusive.a, 0), __shfl_sync(kFullMask, inclusive.b, 0)});
  }
  if (lane == 0) {
    float* out = p.segment_totals + (row * p.segments + segment) * 2;
    out[0] = total.a;
    out[1] = total.b;
  }
}

// kSplit: rows cut into segments (blockIdx.y); whole rows otherwise, which keeps the common case's registers.
template <typename T, int kItems, bool kVec, bool kSplit>
__global__ void __launch_bounds__(kBwdWarps * 32) selective_scan_bwd_kernel(ScanBwdParams p) {
  using namespace scan;
  constexpr int kStep = 32 * kItems;
  __shared__ __align__(16) float dB_step[kBwdWarps][kStep];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int length = static_cast<int>(p.shape.length);  // at most kScanMaxLength (checked at launch)
  const int64_t groups = (p.shape.dim + kBwdWarps - 1) / kBwdWarps;
  const int segment = kSplit ? static_cast<int>(blockIdx.y) : 0;
  const Segment seg = kSplit ? row_segment(length, p.segments, segment) : Segment{0, length};
  const int64_t b = blockIdx.x / groups;
  const int64_t group = blockIdx.x % groups;
  const int64_t d = group * kBwdWarps + warp;
  const bool active = d < p.shape.dim;  // uniform across the warp; idle warps still join the block barriers
  const int64_t row = b * p.shape.dim + (active ? d : 0);

  const T* u = static_cast<const T*>(p.u) + row * length;
  const T* delta = static_cast<const T*>(p.delta) + row * length;
  const T* B = static_cast<const T*>(p.B) + b * length;
  const float* hs = p.hs + row * length;
  const float* dhs = p.dhs + row * length;
  T* du = static_cast<T*>(p.du) + row * length;
  T* ddelta = static_cast<T*>(p.ddelta) + row * length;
  const float A = active ? p.A[d] : 0.f;
  const float A_log2 = A * kLog2e;
  const float bias = active && p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;

  // h entering the current step from its right: zero past the end of the row; at the end of a segment, from the
  // carry pass.
  float carry = kSplit && segment + 1 < p.segments ? p.segment_totals[(row * p.segments + segment) * 2] : 0.f;
  float dA_sum = 0.f;
  float dbias_sum = 0.f;
  const int steps = (seg.end - seg.begin + kStep - 1) / kStep;
  for (int s = steps - 1; s >= 0; --s) {
    const int base = seg.begin + s * kStep;
    const int start = base + lane * kItems;
    float dB_v[kItems];
    if (active) {
      float u_v[kItems], delta_v[kItems], B_v[kItems], x_v[kItems], dhs_v[kItems];
      load_items<T, kItems, kVec>(u, start, seg.end, u_v);
      load_items<T, kItems, kVec>(delta, start, seg.end, delta_v);
      load_items<T, kItems, kVec>(B, start, seg.end, B_v);
      load_items<float, kItems, kVec>(hs, start, seg.end, x_v);
      load_items<float, kItems, kVec>(dhs, start, seg.end, dhs_v);
      // x_{t-1} for this lane's first item: the previous lane's last state, or the previous step's last state.
      float x_before = __shfl_up_sync(kFullMask, x_v[kItems - 1], 1);
      if (lane == 0) x_before = base > 0 ? hs[base - 1] : 0.f;

      float raw[kItems], dt[kItems], decay[kItems];
      const Affine lane_map =
          adjoint_lane_map(delta_v, dhs_v, start, seg.end, A_log2, bias, p.delta_softplus, raw, dt, decay);
      const Affine inclusive = warp_scan_reverse(lane_map, lane);
      Affine after = {__shfl_down_sync(kFullMask, inclusive.a, 1), __shfl_down_sync(kFullMask, inclusive.b, 1)};
      if (lane == 31) after = {1.f, 0.f};

      float h = fmaf(after.a, carry, after.b);
      float du_v[kItems], ddelta_v[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float g = dhs_v[i] + h;
        const float decayed = decay[i] * (i > 0 ? x_v[i - 1] : x_before);  // a_t x_{t-1}
        du_v[i] = g * dt[i] * B_v[i];
        dB_v[i] = g * dt[i] * u_v[i];
        dA_sum = fmaf(g * decayed, dt[i], dA_sum);
        const float d_dt = g * fmaf(A, decayed, B_v[i] * u_v[i]);
        ddelta_v[i] = p.delta_softplus ? d_dt * softplus_grad(raw[i]) : d_dt;
        dbias_sum += ddelta_v[i];  // zero past the end of the row, where g = 0
        h = decay[i] * g;
      }
      store_items<T, kItems, kVec>(du, start, seg.end, du_v);
      store_items<T, kItems, kVec>(ddelta, start, seg.end, ddelta_v);

      const Affine whole = {__shfl_sync(kFullMask, inclusive.a, 0), __shfl_sync(kFullMask, inclusive.b, 0)};
      carry = fmaf(whole.a, carry, whole.b);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) dB_v[i] = 0.f;
    }

    // dB summed over the block's channels for this step's positions.
    store_vector<float, kItems>(&dB_step[warp][lane * kItems], dB_v);
    __syncthreads();
    for (int e = threadIdx.x; e < kStep; e += kBwdWarps * 32) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kBwdWarps; ++w) sum += dB_step[w][e];
      if (base + e < seg.end) p.dB_partial[(b * groups + group) * length + base + e] = sum;
    }
    __syncthreads();
  }

  dA_sum = warp_sum(dA_sum);
  dbias_sum = warp_sum(dbias_sum);
  if (active && lane == 0) {
    const int64_t partial = kSplit ? (segment * p.shape.batch + b) * p.shape.dim + d : b * p.shape.dim + d;
    p.dA_partial[partial] = dA_sum;
    p.ddelta_bias_partial[partial] = dbias_sum;
  }
}

template <typename T>
cudaError_t launch_typed(const ScanBwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.shape.batch * scan_bwd_dim_groups(p.shape.dim)),
                  static_cast<unsigned>(p.segments));
  return scan::dispatch_items(p.shape.length, [&](auto items) {
    constexpr int kItems = decltype(items)::value;
    const bool vec = p.shape.length % kItems == 0 && scan::aligned16(p.u) && scan::aligned16(p.delta) &&
                     scan::aligned16(p.B) && scan::aligned16(p.hs) && scan::aligned16(p.dhs) &&
                     scan::aligned16(p.du) && scan::aligned16(p.ddelta);
    if constexpr (kItems == scan::kSplitItems) {
      // Split rows are at least two segments of kScanSplitMinSegment (or whole granules) long.
      if (p.segments > 1) {
        const int64_t rows = p.shape.batch * p.shape.dim;
        const dim3 totals_grid(static_cast<unsigned>((rows + kBwdWarps - 1) / kBwdWarps),
                               static_cast<unsigned>(p.segments - 1));
        if (vec) {
          selective_scan_bwd_totals_kernel<T, kItems, true><<<totals_grid, kBwdWarps * 32, 0, stream>>>(p);
        } else {
          selective_scan_bwd_totals_kernel<T, kItems, false><<<totals_grid, kBwdWarps * 32, 0, stream>>>(p);
        }
        const cudaError_t error = launch_scan_segment_carries(p.segment_totals, rows, p.segments, true, stream);
        if (error != cudaSuccess) return error;
        if (vec) {
          selective_scan_bwd_kernel<T, kItems, true, true><<<grid, kBwdWarps * 32, 0, stream>>>(p);
        } else {
          selective_scan_bwd_kernel<T, kItems, false, true><<<grid, kBwdWarps * 32, 0, stream>>>(p);
        }
        return cudaGetLastError();
      }
    }
    if (vec) {
      selective_scan_bwd_kernel<T, kItems, true, false><<<grid, kBwdWarps * 32, 0, stream>>>(p);
    } else {
      selective_scan_bwd_kernel<T, kItems, false, false><<<grid, kBwdWarps * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace

int64_t scan_bwd_dim_groups(int64_t dim) { return (dim + kBwdWarps - 1) / kBwdWarps; }

cudaError_t launch_selective_scan_bwd(const ScanBwdParams& p, cudaStream_t stream) {
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
