// Forward and input-gradient kernels of the replicate-padded depthwise convolution (see dwconv2d.h).
//
// Forward: each block stages its tile of x with the halo read through clamped indices (replicate padding), so
// every output is a plain K x K correlation over shared memory, exact at the borders too.
//
// Input gradient: dx[m, n] = Σ_{p,q} w[p, q] Σ {dy[i, j] : clamp(i + D(p - r)) = m, clamp(j + D(q - r)) = n}.
// Away from the image border only i = m - D(p - r), j = n - D(q - r) qualify, which is a correlation of the
// zero-padded dy with the flipped kernel: the same tiled kernel computes it for every pixel off the border.
// Pixels in the first or last row or column also collect the taps whose source was clamped onto them; for those
// the qualifying i (and j) form an interval, and a second kernel sums dy over the intervals (gather form: no
// atomics, deterministic).
#include "dwconv_tile.cuh"

namespace spatial_mamba {
namespace {

using dwconv::TileConfig;

// kDense: dilation 1 at compile time, so each shared-memory value is loaded once per kernel column and reused
// for every row of the thread's strip that needs it. Otherwise the dilation is a run-time value.
template <int K, bool kDense, int kRows>
__global__ void __launch_bounds__(dwconv::kMaxThreads)
    dwconv2d_correlate_kernel(DwconvParams p, TileConfig t, bool input_gradient) {
  extern __shared__ __align__(16) float smem[];
  const int H = static_cast<int>(p.shape.height);
  const int W = static_cast<int>(p.shape.width);
  const int D = kDense ? 1 : p.shape.dilation;
  const int per_plane = t.per_plane_threads();
  const int slot = threadIdx.x / per_plane;
  const int local = threadIdx.x % per_plane;
  const int tx = local % t.tile_w;
  const int row0 = (local / t.tile_w) * kRows;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * t.planes + slot;
  const bool live = slot < t.planes && plane < p.shape.batch * p.shape.channels;
  const int oy0 = static_cast<int>(blockIdx.y / t.tiles_x) * t.tile_h();
  const int ox0 = static_cast<int>(blockIdx.y % t.tiles_x) * t.tile_w;
  const int sw = t.stride();
  const int sh = t.tile_h() + 2 * t.halo;
  float* tile = smem + slot * t.plane_floats;
  float* w_s = tile + sh * sw;
  const int64_t plane_offset = plane * H * W;

  if (live) {
    const float* w = p.weight + (plane % p.shape.channels) * K * K;
    // The input gradient correlates with the kernel flipped along both axes: reversed flat order.
    for (int e = local; e < K * K; e += per_plane) w_s[e] = w[input_gradient ? K * K - 1 - e : e];
    for (int e = local; e < sh * sw; e += per_plane) {
      const int gy = oy0 - t.halo + e / sw;
      const int gx = ox0 - t.halo + e % sw;
      float v;
      if (input_gradient) {
        v = gy >= 0 && gy < H && gx >= 0 && gx < W ? load_as_float(p.src, plane_offset + gy * W + gx, p.kind) : 0.f;
      } else {
        v = load_as_float(p.src, plane_offset + dwconv::clamp_index(gy, H) * W + dwconv::clamp_index(gx, W), p.kind);
      }
      tile[e] = v;
    }
  }
  __syncthreads();
  const int gx = ox0 + tx;
  if (!live || gx >= W) return;  // no barrier follows

  float acc[kRows];
#pragma unroll
  for (int v = 0; v < kRows; ++v) acc[v] = 0.f;
  if constexpr (kDense) {
#pragma unroll
    for (int q = 0; q < K; ++q) {
      float wq[K];
#pragma unroll
      for (int pp = 0; pp < K; ++pp) wq[pp] = w_s[pp * K + q];
      // Tile row row0 + r feeds output row row0 + v through kernel row r - v.
#pragma unroll
      for (int r = 0; r < kRows + K - 1; ++r) {
        const float val = tile[(row0 + r) * sw + tx + q];
#pragma unroll
        for (int pp = 0; pp < K; ++pp) {
          const int v = r - pp;
          if (v >= 0 && v < kRows) acc[v] = fmaf(wq[pp], val, acc[v]);
        }
      }
    }
  } else {
#pragma unroll
    for (int pp = 0; pp < K; ++pp) {
#pragma unroll
      for (int q = 0; q < K; ++q) {
        const float wv = w_s[pp * K + q];
        const float* col = tile + (row0 + pp * D) * sw + tx + q * D;
#pragma unroll
        for (int v = 0; v < kRows; ++v) acc[v] = fmaf(wv, col[v * sw], acc[v]);
      }
    }
  }

#pragma unroll
  for (int v = 0; v < kRows; ++v) {
    const int gy = oy0 + row0 + v;
    if (gy >= H) break;
    // Border pixels of the input gradient are written by dwconv2d_dgrad_border_kernel.
    if (input_gradient && (gy == 0 || gy == H - 1 || gx == 0 || gx == W - 1)) continue;
    store_from_float(p.dst, plane_offset + gy * W + gx, acc[v], p.kind);
  }
}

// The source rows i with clamp(i + offset, 0, size - 1) == m: an interval [lo, hi], empty when lo > hi.
__device__ __forceinline__ void clamped_sources(int m, int offset, int size, int& lo, int& hi) {
  lo = m == 0 ? 0 : m - offset;
  hi = m == size - 1 ? size - 1 : m - offset;
  lo = max(lo, 0);
  hi = min(hi, size - 1);
}

// Input gradient at the image border: one thread per border pixel (first/last row, first/last column).
__global__ void __launch_bounds__(256) dwconv2d_dgrad_border_kernel(DwconvParams p, int64_t border_pixels) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= p.shape.batch * p.shape.channels * border_pixels) return;
  const int H = static_cast<int>(p.shape.height);
  const int W = static_cast<int>(p.shape.width);
  const int K = p.shape.kernel_size;
  const int D = p.shape.dilation;
  const int r = K / 2;
  const int64_t plane = index / border_pixels;
  int e = static_cast<int>(index % border_pixels);
  // Enumeration: the first row, the last row (H > 1), then rows 1..H-2 of the first and last (W > 1) columns.
  int m, n;
  if (e < W) {
    m = 0;
    n = e;
  } else if (H > 1 && e < 2 * W) {
    m = H - 1;
    n = e - W;
  } else {
    e -= (H > 1 ? 2 : 1) * W;
    const int inner = H - 2;
    m = 1 + e % inner;
    n = e / inner == 0 ? 0 : W - 1;
  }
  const float* w = p.weight + (plane % p.shape.channels) * K * K;
  const int64_t plane_offset = plane * H * W;
  float acc = 0.f;
  for (int pp = 0; pp < K; ++pp) {
    int i_lo, i_hi;
    clamped_sources(m, D * (pp - r), H, i_lo, i_hi);
    if (i_lo > i_hi) continue;
    for (int q = 0; q < K; ++q) {
      int j_lo, j_hi;
      clamped_sources(n, D * (q - r), W, j_lo, j_hi);
      float sum = 0.f;
      for (int i = i_lo; i <= i_hi; ++i) {
        for (int j = j_lo; j <= j_hi; ++j) sum += load_as_float(p.src, plane_offset + i * W + j, p.kind);
      }
      acc = fmaf(w[pp * K + q], sum, acc);
    }
  }
  store_from_float(p.dst, plane_offset + m * W + n, acc, p.kind);
}

int64_t border_pixel_count(int64_t H, int64_t W) {
  return (H > 1 ? 2 : 1) * W + (W > 1 ? 2 : 1) * std::max<int64_t>(H - 2, 0);
}

template <int K, bool kDense>
cudaError_t launch_correlate(const DwconvParams& p, bool input_gradient, cudaStream_t stream) {
  constexpr int kRows = kDense ? 8 : 4;
  const TileConfig t = dwconv::make_tile_config(p.shape, kRows, dwconv::kMaxThreads);
  const int64_t bytes = dwconv::shared_bytes(t, K);
  const auto kernel = dwconv2d_correlate_kernel<K, kDense, kRows>;
  cudaError_t error = dwconv::prepare_shared(kernel, bytes);
  if (error != cudaSuccess) return error;
  const int64_t planes = p.shape.batch * p.shape.channels;
  const dim3 grid(static_cast<unsigned>(dwconv::ceil_div(planes, t.planes)),
                  static_cast<unsigned>(t.tiles_x * t.tiles_y));
  kernel<<<grid, t.threads, bytes, stream>>>(p, t, input_gradient);
  return cudaGetLastError();
}

cudaError_t launch_correlate_any(const DwconvParams& p, bool input_gradient, cudaStream_t stream) {
  return dwconv::dispatch_kernel_size(p.shape.kernel_size, [&](auto k) {
    constexpr int K = decltype(k)::value;
    return p.shape.dilation == 1 ? launch_correlate<K, true>(p, input_gradient, stream)
                                 : launch_correlate<K, false>(p, input_gradient, stream);
  });
}

bool empty(const DwconvShape& s) { return s.batch * s.channels * s.height * s.width == 0; }

}  // namespace

int64_t dwconv2d_shared_bytes(const DwconvShape& shape) {
  // The smallest configuration (one plane per block) of the forward, input-gradient and weight-gradient kernels.
  int64_t bytes = 0;
  for (const int rows : {4, 8}) {
    bytes = std::max(bytes, dwconv::shared_bytes(dwconv::make_tile_config(shape, rows, 1), shape.kernel_size));
  }
  return bytes;
}

int64_t dwconv2d_spatial_tiles(const DwconvShape& shape) {
  const TileConfig t = dwconv::make_tile_config(shape, 4, 1);  // the smallest tiles of any of the kernels
  return static_cast<int64_t>(t.tiles_x) * t.tiles_y;
}

cudaError_t dwconv2d_max_shared_bytes(int64_t* bytes) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  int value = 0;
  error = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *bytes = value;
  return error;
}

cudaError_t launch_dwconv2d_fwd(const DwconvParams& p, cudaStream_t stream) {
  if (empty(p.shape)) return cudaSuccess;
  return launch_correlate_any(p, /*input_gradient=*/false, stream);
}

cudaError_t launch_dwconv2d_dgrad(const DwconvParams& p, cudaStream_t stream) {
  if (empty(p.shape)) return cudaSuccess;
  cudaError_t error = launch_correlate_any(p, /*input_gradient=*/true, stream);
  if (error != cudaSuccess) return error;
  const int64_t border = border_pixel_count(p.shape.height, p.shape.width);
  const int64_t threads = p.shape.batch * p.shape.channels * border;
  dwconv2d_dgrad_border_kernel<<<static_cast<unsigned>(dwconv::ceil_div(threads, 256)), 256, 0, stream>>>(p, border);
  return cudaGetLastError();
}

}  // namespace spatial_mamba
