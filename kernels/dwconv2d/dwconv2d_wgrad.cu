// Weight-gradient kernel of the replicate-padded depthwise convolution (see dwconv2d.h):
//   dw[c, p, q] = Σ_{b, i, j} dy[b, c, i, j] x[b, c, clamp(i + D(p - r)), clamp(j + D(q - r))].
// A block owns one channel, one spatial tile and up to three kernel rows (all K x K taps of a large kernel would
// not fit in registers), and walks a slice of the batch: it stages each x tile with its clamped halo (as the
// forward does) and accumulates its taps in registers. The block then sums its threads' taps (warp shuffles, then
// shared memory) into one partial result per (batch slice, tile); the binding adds the partials up. No atomics,
// so the result does not depend on scheduling.
#include "dwconv_tile.cuh"

namespace spatial_mamba {
namespace {

using dwconv::TileConfig;

constexpr int kWgradRows = 4;
constexpr int kTapRowsPerBlock = 3;

__host__ __device__ constexpr int tap_groups(int k) { return (k + kTapRowsPerBlock - 1) / kTapRowsPerBlock; }
// Blocks to aim for: enough to fill the GPU several times over before slicing the batch further.
constexpr int64_t kWgradTargetBlocks = 2048;

struct WgradSplit {
  int64_t items = 0;   // batch items per slice
  int64_t slices = 0;  // gridDim.z
};

WgradSplit make_split(const DwconvShape& s, const TileConfig& t) {
  const int64_t rounds = dwconv::ceil_div(s.batch, t.planes);  // block iterations if one slice held the batch
  const int64_t per_slice_blocks = s.channels * t.tiles_x * t.tiles_y;
  const int64_t slices = std::min(rounds, std::max<int64_t>(1, dwconv::ceil_div(kWgradTargetBlocks, per_slice_blocks)));
  WgradSplit split;
  split.items = dwconv::ceil_div(rounds, slices) * t.planes;
  split.slices = dwconv::ceil_div(s.batch, split.items);
  return split;
}

// blockIdx.z = slice * tap_groups(K) + group: the group's kernel rows are group * 3 .. group * 3 + 2.
template <int K>
__global__ void __launch_bounds__(dwconv::kMaxThreads)
    dwconv2d_wgrad_kernel(DwconvWgradParams p, TileConfig t, int64_t slice_items) {
  extern __shared__ __align__(16) float smem[];
  constexpr int kRows = K < kTapRowsPerBlock ? K : kTapRowsPerBlock;
  constexpr int kTaps = kRows * K;
  const int group = static_cast<int>(blockIdx.z % tap_groups(K));
  const int64_t slice = blockIdx.z / tap_groups(K);
  const int first_row = group * kRows;
  const int H = static_cast<int>(p.shape.height);
  const int W = static_cast<int>(p.shape.width);
  const int D = p.shape.dilation;
  const int64_t C = p.shape.channels;
  const int64_t c = blockIdx.x;
  const int per_plane = t.per_plane_threads();
  const int slot = threadIdx.x / per_plane;  // >= t.planes for the padding threads of the last warp
  const int local = threadIdx.x % per_plane;
  const int tx = local % t.tile_w;
  const int row0 = (local / t.tile_w) * kWgradRows;
  const int oy0 = static_cast<int>(blockIdx.y / t.tiles_x) * t.tile_h();
  const int ox0 = static_cast<int>(blockIdx.y % t.tiles_x) * t.tile_w;
  const int gx = ox0 + tx;
  const int sw = t.stride();
  const int sh = t.tile_h() + 2 * t.halo;
  float* tile = smem + slot * t.plane_floats;

  float acc[kTaps];
#pragma unroll
  for (int k = 0; k < kTaps; ++k) acc[k] = 0.f;

  const int64_t first = slice * slice_items;
  const int64_t last = first + slice_items < p.shape.batch ? first + slice_items : p.shape.batch;
  for (int64_t b0 = first; b0 < last; b0 += t.planes) {
    const int64_t b = b0 + slot;
    const bool live = slot < t.planes && b < last;
    const int64_t plane_offset = (b * C + c) * H * W;
    __syncthreads();  // the previous round is done with the tiles
    if (live) {
      for (int e = local; e < sh * sw; e += per_plane) {
        const int gy = oy0 - t.halo + e / sw;
        const int gxx = ox0 - t.halo + e % sw;
        tile[e] = load_as_float(p.x, plane_offset + dwconv::clamp_index(gy, H) * W + dwconv::clamp_index(gxx, W),
                                p.kind);
      }
    }
    __syncthreads();
    if (live && gx < W) {
#pragma unroll 1
      for (int v = 0; v < kWgradRows; ++v) {
        const int gy = oy0 + row0 + v;
        if (gy >= H) break;
        const float g = load_as_float(p.dy, plane_offset + gy * W + gx, p.kind);
        const float* base = tile + (row0 + v + first_row * D) * sw + tx;
#pragma unroll
        for (int pp = 0; pp < kRows; ++pp) {
          if (first_row + pp >= K) break;
#pragma unroll
          for (int q = 0; q < K; ++q) acc[pp * K + q] = fmaf(g, base[pp * D * sw + q * D], acc[pp * K + q]);
        }
      }
    }
  }

  // Block sum of every tap: within each warp, then across the warps through shared memory.
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int k = 0; k < kTaps; ++k) {
    float v = acc[k];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) smem[warp * kTaps + k] = v;
  }
  __syncthreads();
  const int64_t partial = slice * gridDim.y + blockIdx.y;
  const int taps = (K - first_row < kRows ? K - first_row : kRows) * K;  // the last group may hold fewer rows
  for (int k = threadIdx.x; k < taps; k += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += smem[w * kTaps + k];
    p.dw_partial[(partial * C + c) * K * K + first_row * K + k] = sum;
  }
}

}  // namespace

int64_t dwconv2d_wgrad_partials(const DwconvShape& shape) {
  const TileConfig t = dwconv::make_tile_config(shape, kWgradRows, dwconv::kMaxThreads);
  return make_split(shape, t).slices * t.tiles_x * t.tiles_y;
}

cudaError_t launch_dwconv2d_wgrad(const DwconvWgradParams& p, cudaStream_t stream) {
  if (p.shape.batch * p.shape.channels * p.shape.height * p.shape.width == 0) return cudaSuccess;
  return dwconv::dispatch_kernel_size(p.shape.kernel_size, [&](auto k) {
    constexpr int K = decltype(k)::value;
    const TileConfig t = dwconv::make_tile_config(p.shape, kWgradRows, dwconv::kMaxThreads);
    const WgradSplit split = make_split(p.shape, t);
    const int64_t bytes = dwconv::shared_bytes(t, K);
    const auto kernel = dwconv2d_wgrad_kernel<K>;
    cudaError_t error = dwconv::prepare_shared(kernel, bytes);
    if (error != cudaSuccess) return error;
    const dim3 grid(static_cast<unsigned>(p.shape.channels), static_cast<unsigned>(t.tiles_x * t.tiles_y),
                    static_cast<unsigned>(split.slices * tap_groups(K)));
    kernel<<<grid, t.threads, bytes, stream>>>(p, t, split.items);
    return cudaGetLastError();
  });
}

}  // namespace spatial_mamba
