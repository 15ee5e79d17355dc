// Tiling shared by the depthwise-convolution kernels.
//
// A block computes one output tile of `tile_w` columns x `strips * rows` rows for each of `planes` planes (several
// planes per block when the image is small). Each thread owns one column and `rows` consecutive rows of a tile.
// The tile's input, with a halo of D * (K / 2) on every side, is staged in shared memory as float32 together with
// the plane's K x K weights.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/float_io.cuh"
#include "dwconv2d.h"

namespace spatial_mamba {
namespace dwconv {

constexpr int kMaxThreads = 256;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

struct TileConfig {
  int tile_w = 0;   // columns per tile (threads along a row)
  int strips = 0;   // threads along a column, each computing `rows` consecutive rows
  int rows = 0;
  int planes = 0;   // planes handled by one block
  int halo = 0;     // D * (K / 2)
  int tiles_x = 0;
  int tiles_y = 0;
  int threads = 0;  // tile_w * strips * planes, rounded up to whole warps
  int plane_floats = 0;  // shared floats per plane: the haloed input tile, then the K x K weights

  __host__ __device__ int tile_h() const { return strips * rows; }
  __host__ __device__ int stride() const { return tile_w + 2 * halo; }
  __host__ __device__ int per_plane_threads() const { return tile_w * strips; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline TileConfig make_tile_config(const DwconvShape& s, int rows, int max_planes) {
  TileConfig t;
  t.rows = rows;
  t.tile_w = s.width > 16 ? 32 : (s.width > 8 ? 16 : 8);
  t.strips = static_cast<int>(std::min<int64_t>(kMaxThreads / t.tile_w, ceil_div(s.height, rows)));
  t.halo = s.dilation * (s.kernel_size / 2);
  t.tiles_x = static_cast<int>(ceil_div(s.width, t.tile_w));
  t.tiles_y = static_cast<int>(ceil_div(s.height, t.tile_h()));
  t.plane_floats = (t.tile_h() + 2 * t.halo) * t.stride() + s.kernel_size * s.kernel_size;
  const int64_t by_threads = kMaxThreads / t.per_plane_threads();
  const int64_t by_memory = kDefaultSharedBytes / (t.plane_floats * static_cast<int64_t>(sizeof(float)));
  t.planes = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({by_threads, by_memory, max_planes})));
  t.threads = static_cast<int>(ceil_div(t.per_plane_threads() * t.planes, 32) * 32);
  return t;
}

inline int64_t shared_bytes(const TileConfig& t, int kernel_size) {
  // The weight-gradient kernel reuses the buffer for its per-warp sums of the K x K taps.
  const int64_t tiles = static_cast<int64_t>(t.plane_floats) * t.planes;
  return sizeof(float) * std::max<int64_t>(tiles, (t.threads / 32) * kernel_size * kernel_size);
}

// Opts in to more than the default 48 KiB of dynamic shared memory when a shape needs it.
template <typename Kernel>
cudaError_t prepare_shared(Kernel kernel, int64_t bytes) {
  if (bytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Calls launch(std::integral_constant<int, K>) for the compiled kernel sizes.
template <typename F>
cudaError_t dispatch_kernel_size(int k, F&& launch) {
  switch (k) {
    case 3:
      return launch(std::integral_constant<int, 3>{});
    case 5:
      return launch(std::integral_constant<int, 5>{});
    case 7:
      return launch(std::integral_constant<int, 7>{});
    case 9:
      return launch(std::integral_constant<int, 9>{});
    case 11:
      return launch(std::integral_constant<int, 11>{});
    default:
      return cudaErrorInvalidValue;
  }
}

__device__ __forceinline__ int clamp_index(int i, int size) { return i < 0 ? 0 : (i >= size ? size - 1 : i); }

}  // namespace dwconv
}  // namespace spatial_mamba
