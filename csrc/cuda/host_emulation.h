// fasttversky: run tversky_cuda.cu's kernels on the CPU, for tests on machines without a
// GPU. Included by tversky_cuda.cu (instead of cuda_runtime.h) when it is compiled by a
// host C++20 compiler with -DTV_HOST_EMULATION; never part of a real CUDA build.
//
// Blocks run one after another; the threads of a block run as std::threads, so
// __syncthreads is a std::barrier, __shared__ is a function-local static (one block at a
// time), and __shfl_xor_sync exchanges through a per-warp buffer between two warp
// barriers. That is enough to exercise exactly the indexing, masking, vector paths and
// fixed-order reductions that the GPU runs; it says nothing about speed.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include <vector_types.h>  // dim3, as in a CUDA build

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

typedef struct CUstream_st* cudaStream_t;

namespace tv_emu {

struct Block {
  explicit Block(unsigned threads) : bar(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warp_bars.emplace_back(std::make_unique<std::barrier<>>(32));
    xchg.resize((threads + 31) / 32 * 32);
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint64_t> xchg;  // one slot per thread for warp shuffles
};

inline thread_local dim3 thread_idx, block_idx;
inline dim3 grid_dim, block_dim;
inline thread_local Block* block = nullptr;

template <typename K, typename... A>
void launch(K kernel, dim3 grid, dim3 threads, A... args) {
  grid_dim = grid;
  block_dim = threads;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(threads.x);
        std::vector<std::thread> pool;
        pool.reserve(threads.x);
        for (unsigned t = 0; t < threads.x; ++t)
          pool.emplace_back([&, t] {
            thread_idx = dim3(t, 0, 0);
            block_idx = dim3(bx, by, bz);
            block = &blk;
            kernel(args...);
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace tv_emu

#define threadIdx (tv_emu::thread_idx)
#define blockIdx (tv_emu::block_idx)
#define gridDim (tv_emu::grid_dim)
#define blockDim (tv_emu::block_dim)

inline void __syncthreads() { tv_emu::block->bar.arrive_and_wait(); }

template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  tv_emu::Block& blk = *tv_emu::block;
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  memcpy(&blk.xchg[t], &v, sizeof(V));
  blk.warp_bars[warp]->arrive_and_wait();
  V r;
  memcpy(&r, &blk.xchg[warp * 32 + (lane ^ (unsigned)lane_mask)], sizeof(V));
  blk.warp_bars[warp]->arrive_and_wait();
  return r;
}

using std::isfinite;

#define TV_LAUNCH(kernel, grid, block, stream, ...) \
  tv_emu::launch(kernel, dim3(grid), dim3(block), __VA_ARGS__)
#define TV_LAST_ERROR() 0
#define TV_SET_DEVICE(d) ((void)(d), 0)
