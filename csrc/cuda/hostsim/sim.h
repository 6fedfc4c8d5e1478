// Runs kernels.cu on the CPU, for testing its index math without a GPU (see ./run).
//
// Each CUDA thread of a block is a std::thread; blocks run one after another, so `__shared__` can be a
// function-local static. __syncthreads is a block barrier, __shfl_down_sync a per-warp exchange through
// a slot array and a warp barrier. Covers exactly what kernels.cu uses: 1-D/2-D blocks whose size is a
// multiple of 32, __shfl_down_sync on float/double, no atomics. Not a CUDA emulator in general.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>
#include <functional>
#include <cstring>
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline
namespace sim {
struct Ctx { uint3 tid, bid; dim3 bdim, gdim; };
inline thread_local Ctx ctx;
inline std::barrier<>* block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline double slots[32][32];
inline int linear_tid() { return ctx.tid.x + ctx.tid.y * ctx.bdim.x + ctx.tid.z * ctx.bdim.x * ctx.bdim.y; }
inline long long launches = 0;
template <typename K>
auto launch(dim3 g, dim3 b, size_t, cudaStream_t, K* kernel) {
  return [=](auto... args) {
    ++launches;
    const int T = b.x * b.y * b.z;
    if (T % 32 || T > 1024) { fprintf(stderr, "bad block %d\n", T); abort(); }
    std::barrier<> bar(T);
    block_bar = &bar;
    warp_bars.clear();
    for (int w = 0; w < T / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> th;
    for (int t = 0; t < T; ++t) th.emplace_back([=, &bar] {
      for (unsigned bz = 0; bz < g.z; ++bz) for (unsigned by = 0; by < g.y; ++by) for (unsigned bx = 0; bx < g.x; ++bx) {
        ctx.tid = {unsigned(t % b.x), unsigned((t / b.x) % b.y), unsigned(t / (b.x * b.y))};
        ctx.bid = {bx, by, bz}; ctx.bdim = b; ctx.gdim = g;
        kernel(args...);
        bar.arrive_and_wait();
      }
    });
    for (auto& x : th) x.join();
  };
}
}  // namespace sim
#define threadIdx (sim::ctx.tid)
#define blockIdx (sim::ctx.bid)
#define blockDim (sim::ctx.bdim)
#define gridDim (sim::ctx.gdim)
inline void __syncthreads() { sim::block_bar->arrive_and_wait(); }
template <typename T> T __shfl_down_sync(unsigned, T v, int off) {
  int lin = sim::linear_tid(), w = lin / 32, l = lin % 32;
  sim::slots[w][l] = (double)v;
  sim::warp_bars[w]->arrive_and_wait();
  T r = (l + off < 32) ? (T)sim::slots[w][l + off] : v;
  sim::warp_bars[w]->arrive_and_wait();
  return r;
}
