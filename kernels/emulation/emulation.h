// CPU emulation of the small part of the CUDA execution model the kernels use, so that their source can be
// compiled with g++ and checked against the reference on machines without a GPU (tests/kernels/
// test_cuda_emulated.py). One OS thread per CUDA thread; the blocks of a launch run one after another; warp shuffles
// and __syncthreads are barriers. Dynamic shared memory is filled with NaN before every block, so a read of a value
// no thread wrote shows up in the results. Not a simulator: no timing, no memory model beyond "blocks are serial".
//
// The test rewrites two constructs before compiling: `kernel<<<grid, block, bytes, stream>>>(args)` becomes
// `::emu::launch(kernel, grid, block, bytes, stream, args)`, and `extern __shared__ ... float smem[]` becomes
// `float* smem = ::emu::dynamic_shared()`.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 {
  unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 227 * 1024;  // an H100's opt-in limit
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}

using std::max;
using std::min;

namespace emu {

struct Warp {
  explicit Warp(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  // Two sets of slots used alternately: a lane may publish its next value while others still read the last one.
  float slots[2][32];
};

struct Block {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<float> dynamic_shared;
};

struct Context {
  dim3 block_idx, thread_idx, block_dim, grid_dim;
  Block* block = nullptr;
  int exchange_parity = 0;
};
inline thread_local Context context;

inline float* dynamic_shared() { return context.block->dynamic_shared.data(); }

// Every lane of the warp publishes `value`; each gets the value of lane `source`. All lanes of a warp make the same
// sequence of exchanges, so they agree on which set of slots is current.
inline float exchange(float value, int source) {
  const int t = static_cast<int>(context.thread_idx.x);
  Warp& warp = *context.block->warps[t / 32];
  float* slots = warp.slots[context.exchange_parity];
  context.exchange_parity ^= 1;
  slots[t % 32] = value;
  warp.barrier.arrive_and_wait();
  return slots[source];
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block_dim, int64_t shared_bytes, cudaStream_t, Args... args) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const float poison = std::numeric_limits<float>::quiet_NaN();
  Block block;
  block.sync = std::make_unique<std::barrier<>>(threads);
  for (int w = 0; w * 32 < threads; ++w) block.warps.push_back(std::make_unique<Warp>(std::min(32, threads - w * 32)));
  block.dynamic_shared.assign(shared_bytes / sizeof(float) + 1, poison);
  std::barrier<> block_end(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      context.block = &block;
      context.block_dim = block_dim;
      context.grid_dim = grid;
      context.thread_idx = dim3(t);
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            context.block_idx = dim3(x, y, z);
            kernel(args...);
            block_end.arrive_and_wait();
            if (t == 0) std::fill(block.dynamic_shared.begin(), block.dynamic_shared.end(), poison);
            block_end.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& thread : pool) thread.join();
}

}  // namespace emu

#define blockIdx (::emu::context.block_idx)
#define threadIdx (::emu::context.thread_idx)
#define blockDim (::emu::context.block_dim)
#define gridDim (::emu::context.grid_dim)

inline float __fdividef(float a, float b) { return a / b; }

inline void __syncthreads() { emu::context.block->sync->arrive_and_wait(); }
inline float __shfl_sync(unsigned, float v, int source) { return emu::exchange(v, source); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::exchange(v, (threadIdx.x % 32) ^ mask); }
// Lanes whose source is outside the warp keep their own value, as on the GPU.
inline float __shfl_up_sync(unsigned, float v, int delta) {
  const int lane = threadIdx.x % 32;
  return emu::exchange(v, lane >= delta ? lane - delta : lane);
}
inline float __shfl_down_sync(unsigned, float v, int delta) {
  const int lane = threadIdx.x % 32;
  return emu::exchange(v, lane + delta < 32 ? lane + delta : lane);
}
