// The CUDA kernels of pystage (interface and conventions: kernels.h).
//
// Plain CUDA: no ATen/torch header, so this file compiles with nvcc alone and
// its host-side launchers can be exercised without torch. glue.cpp turns them
// into the pystage::DeviceKernels table.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kThreads = 256;             // threads per block of the 1-D kernels
constexpr int64_t kMaxBlocks = 1 << 20;   // grid-stride loops cover the rest
constexpr int64_t kMaxGridY = 65535;      // CUDA limit on gridDim.y
constexpr int64_t kTargetBlocks = 1024;   // enough blocks to fill a large GPU (132 SMs x 8)

// ---------------------------------------------------------------- element types
// torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__: convert explicitly.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(float v) { return v; }
  static __device__ __forceinline__ float store(Acc a) { return a; }
};
template <> struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ Acc load(double v) { return v; }
  static __device__ __forceinline__ double store(Acc a) { return a; }
};
template <> struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(Acc a) { return __float2half_rn(a); }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(Acc a) { return __float2bfloat16_rn(a); }
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Calls f(T{}) with the element type of a dtype code; cudaErrorInvalidValue for an unknown code.
template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case PYSTAGE_CUDA_FLOAT32: return f(float{});
    case PYSTAGE_CUDA_FLOAT64: return f(double{});
    case PYSTAGE_CUDA_FLOAT16: return f(__half{});
    case PYSTAGE_CUDA_BFLOAT16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// Copies and zero-fills move bytes, not numbers: they run on the widest unsigned "unit" (1..16 bytes)
// that divides the contiguous run length and the alignment of every base pointer.
template <typename F>
cudaError_t dispatch_unit(int64_t run_bytes, uintptr_t align, F&& f) {
  const uint64_t a = static_cast<uint64_t>(run_bytes) | static_cast<uint64_t>(align);
  if (a % 16 == 0) return f(uint4{}, 16);
  if (a % 8 == 0) return f(uint2{}, 8);
  if (a % 4 == 0) return f(uint32_t{}, 4);
  if (a % 2 == 0) return f(uint16_t{}, 2);
  return f(uint8_t{}, 1);
}

// ---------------------------------------------------------------- reductions
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? warp_sums[lane] : A(0);
    v = warp_sum(v);
  }
  return v;
}

// ---------------------------------------------------------------- gather / scatter along dim 1
// Element e of the (outer, n_idx, inner_u) side is (o, j, i); the other side is (outer, n_other, inner_u)
// at row idx[j]. I is uint32_t when every offset fits, else int64_t (fewer and cheaper divisions).
template <typename U, typename I, bool kScatter>
__global__ void __launch_bounds__(kThreads) index_copy_kernel(const U* __restrict__ src, U* __restrict__ dst,
                                                              const int64_t* __restrict__ idx, I n_idx, I n_other,
                                                              I inner_u, I total) {
  const I step = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I e = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); e < total;
       e += step) {
    const I row = e / inner_u, i = e - row * inner_u;
    const I o = row / n_idx, j = row - o * n_idx;
    const int64_t k = idx[j];
    const bool ok = k >= 0 && k < static_cast<int64_t>(n_other);
    const I other = (o * n_other + static_cast<I>(k)) * inner_u + i;
    if (kScatter) {
      if (ok) dst[other] = src[e];
    } else {
      dst[e] = ok ? src[other] : U{};
    }
  }
}

template <bool kScatter>
cudaError_t index_copy(const void* src, void* dst, const int64_t* idx, int64_t outer, int64_t n_other, int64_t n_idx,
                       int64_t inner, int dtype, cudaStream_t stream) {
  const int64_t esize = static_cast<int64_t>(pystage_cuda_dtype_size(dtype));
  if (esize == 0 || outer < 0 || n_other < 0 || n_idx < 0 || inner < 0) return cudaErrorInvalidValue;
  if (outer == 0 || n_idx == 0 || inner == 0) return cudaSuccess;
  if (n_other == 0 || src == nullptr || dst == nullptr || idx == nullptr) return cudaErrorInvalidValue;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  return dispatch_unit(inner * esize, align, [&](auto unit, int64_t ubytes) {
    using U = decltype(unit);
    const int64_t inner_u = inner * esize / ubytes;
    const int64_t total = outer * n_idx * inner_u;
    const int64_t biggest = outer * max64(n_idx, n_other) * inner_u;  // largest offset + 1 on either side
    const unsigned blocks = static_cast<unsigned>(min64(ceil_div(total, kThreads), kMaxBlocks));
    const U* s = static_cast<const U*>(src);
    U* d = static_cast<U*>(dst);
    if (biggest < (int64_t{1} << 31)) {  // uint32 math: e + step stays below 2^32
      index_copy_kernel<U, uint32_t, kScatter><<<blocks, kThreads, 0, stream>>>(
          s, d, idx, static_cast<uint32_t>(n_idx), static_cast<uint32_t>(n_other), static_cast<uint32_t>(inner_u),
          static_cast<uint32_t>(total));
    } else {
      index_copy_kernel<U, int64_t, kScatter><<<blocks, kThreads, 0, stream>>>(s, d, idx, n_idx, n_other, inner_u,
                                                                               total);
    }
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------- bias gradient
// Two layouts of the first pass, picked by `inner`:
//  * rows (inner >= 32, conv): block (channel k, split s) sums the rows o of its split; each warp reads
//    whole contiguous runs grad[o, c0 + k, :]. Partial sums: (splits, n). With one split it writes `out`.
//  * columns (inner < 32, linear): the n * inner values of one row o are contiguous, so a block is 32
//    consecutive columns x kColRows rows of threads walking down its split of rows. Partial sums:
//    (splits, n, inner).
// The second pass (one warp per channel) adds a channel's partial sums in a fixed order: deterministic.
constexpr int64_t kRowsMinInner = 32;
constexpr int kColRows = 8;                 // blockDim.y of the column kernel (blockDim.x = 32)
constexpr int64_t kRowsMinElems = 2048;     // at least 8 loads per thread per block (rows kernel)
constexpr int64_t kColsMinRows = 4 * kColRows;  // at least 4 loads per thread per block (column kernel)

struct BiasPlan {
  bool rows;            // rows layout (else columns)
  int64_t splits;       // blocks along `outer`
  int64_t rows_per_split;
  int64_t per_split;    // partial values per split: n (rows) or n * inner (columns)
  bool direct;          // rows layout with one split: the first pass writes out, no workspace
};

BiasPlan plan_bias_grad(int64_t outer, int64_t inner, int64_t n) {
  BiasPlan p{};
  p.rows = inner >= kRowsMinInner;
  int64_t blocks_per_split, min_rows;
  if (p.rows) {
    blocks_per_split = n;
    min_rows = ceil_div(kRowsMinElems, inner);
    p.per_split = n;
  } else {
    blocks_per_split = ceil_div(n * inner, 32);
    min_rows = kColsMinRows;
    p.per_split = n * inner;
  }
  const int64_t want = max64(1, ceil_div(kTargetBlocks, max64(blocks_per_split, 1)));
  int64_t rows = max64(ceil_div(outer, want), min_rows);
  rows = max64(rows, ceil_div(outer, kMaxGridY));
  p.rows_per_split = max64(rows, 1);
  p.splits = max64(1, ceil_div(outer, p.rows_per_split));
  p.direct = p.rows && p.splits == 1;
  return p;
}

template <typename T, bool kDirect>
__global__ void __launch_bounds__(kThreads) bias_grad_rows_kernel(const T* __restrict__ grad,
                                                                  typename Elem<T>::Acc* __restrict__ partial,
                                                                  T* __restrict__ out, int64_t outer, int64_t channels,
                                                                  int64_t inner, int64_t c0, int64_t n,
                                                                  int64_t rows_per_split) {
  using A = typename Elem<T>::Acc;
  const int64_t k = blockIdx.x;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  A acc = A(0);
  for (int64_t o = o_begin + warp; o < o_end; o += warps) {
    const T* run = grad + (o * channels + c0 + k) * inner;
#pragma unroll 4
    for (int64_t i = lane; i < inner; i += 32) acc += Elem<T>::load(run[i]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (kDirect) out[k] = Elem<T>::store(acc);
    else partial[static_cast<int64_t>(blockIdx.y) * n + k] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kColRows) bias_grad_cols_kernel(const T* __restrict__ grad,
                                                                       typename Elem<T>::Acc* __restrict__ partial,
                                                                       int64_t outer, int64_t row_stride, int64_t col0,
                                                                       int64_t cols, int64_t rows_per_split) {
  using A = typename Elem<T>::Acc;
  __shared__ A tile[kColRows][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  A acc = A(0);
  if (col < cols) {
    const T* p = grad + col0 + col;
#pragma unroll 4
    for (int64_t o = o_begin + threadIdx.y; o < o_end; o += kColRows) acc += Elem<T>::load(p[o * row_stride]);
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    A s = A(0);
#pragma unroll
    for (int y = 0; y < kColRows; ++y) s += tile[y][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + col] = s;
  }
}

// partial: (splits, n, r); out[k] = sum over s, q of partial[s, k, q]. One warp per channel.
template <typename T>
__global__ void __launch_bounds__(kThreads) bias_grad_finish_kernel(const typename Elem<T>::Acc* __restrict__ partial,
                                                                    T* __restrict__ out, int64_t n, int64_t splits,
                                                                    int64_t r) {
  using A = typename Elem<T>::Acc;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (k >= n) return;  // the whole warp shares k: no lane is left behind in warp_sum
  A acc = A(0);
  const int64_t m = splits * r;
  for (int64_t t = lane; t < m; t += 32) {
    const int64_t s = t / r, q = t - s * r;
    acc += partial[(s * n + k) * r + q];
  }
  acc = warp_sum(acc);
  if (lane == 0) out[k] = Elem<T>::store(acc);
}

// ---------------------------------------------------------------- narrow copy (+ bias) along dim 1
// The rows layout of the bias gradient, also writing what it reads: block (channel k, split s) copies the runs
// src[o, c0 + k, :] of its rows o to dst[o, k, :] and sums them. kBias false: copy only.
template <typename T, bool kBias, bool kDirect>
__global__ void __launch_bounds__(kThreads) narrow_copy_bias_kernel(const T* __restrict__ src, T* __restrict__ dst,
                                                                    typename Elem<T>::Acc* __restrict__ partial,
                                                                    T* __restrict__ bias, int64_t outer,
                                                                    int64_t channels, int64_t inner, int64_t c0,
                                                                    int64_t n, int64_t rows_per_split) {
  using A = typename Elem<T>::Acc;
  const int64_t k = blockIdx.x;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t o_end = o_begin + rows_per_split < outer ? o_begin + rows_per_split : outer;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  A acc = A(0);
  for (int64_t o = o_begin + warp; o < o_end; o += warps) {
    const T* run = src + (o * channels + c0 + k) * inner;
    T* out = dst + (o * n + k) * inner;
#pragma unroll 4
    for (int64_t i = lane; i < inner; i += 32) {
      const T v = run[i];
      out[i] = v;
      if (kBias) acc += Elem<T>::load(v);
    }
  }
  if (!kBias) return;
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    if (kDirect) bias[k] = Elem<T>::store(acc);
    else partial[static_cast<int64_t>(blockIdx.y) * n + k] = acc;
  }
}

// ---------------------------------------------------------------- pad along dim 1
// dst unit e = (o, c, i) of (outer, channels, inner_u): src[o, c - c0, i] inside [c0, c0 + n), else zero.
template <typename U, typename I>
__global__ void __launch_bounds__(kThreads) pad_dim1_kernel(const U* __restrict__ src, U* __restrict__ dst, I n,
                                                            I channels, I inner_u, I c0, I total) {
  const I step = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I e = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); e < total;
       e += step) {
    const I row = e / inner_u, i = e - row * inner_u;
    const I o = row / channels, c = row - o * channels;
    dst[e] = (c >= c0 && c - c0 < n) ? src[(o * n + (c - c0)) * inner_u + i] : U{};
  }
}

// ---------------------------------------------------------------- block-triangular mask
// Block x-loop over rows o; the row's step s is found by binary search in out_ends, then the row's tail
// [in_ends[s] * inner, in * inner) is zeroed by the block's threads (and the gridDim.y blocks of that row).
template <typename U>
__global__ void __launch_bounds__(kThreads) block_triangular_mask_kernel(U* __restrict__ w, int64_t rows,
                                                                         int64_t in, int64_t inner_u,
                                                                         const int64_t* __restrict__ out_ends,
                                                                         const int64_t* __restrict__ in_ends,
                                                                         int64_t steps) {
  const int64_t row_u = in * inner_u;
  for (int64_t o = blockIdx.x; o < rows; o += gridDim.x) {
    int64_t lo = 0, hi = steps - 1;  // first s with out_ends[s] > o (the last step if none)
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (out_ends[mid] > o) hi = mid;
      else lo = mid + 1;
    }
    int64_t col0 = in_ends[lo];
    col0 = col0 < 0 ? 0 : col0;
    if (col0 >= in) continue;
    U* row = w + o * row_u;
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
    for (int64_t e = col0 * inner_u + static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; e < row_u; e += step)
      row[e] = U{};
  }
}

}  // namespace

extern "C" {

size_t pystage_cuda_dtype_size(int dtype) {
  switch (dtype) {
    case PYSTAGE_CUDA_FLOAT32: return 4;
    case PYSTAGE_CUDA_FLOAT64: return 8;
    case PYSTAGE_CUDA_FLOAT16: return 2;
    case PYSTAGE_CUDA_BFLOAT16: return 2;
    default: return 0;
  }
}

cudaError_t pystage_cuda_gather_dim1(const void* src, void* dst, const int64_t* idx, int64_t outer, int64_t n_src,
                                     int64_t n_idx, int64_t inner, int dtype, cudaStream_t stream) {
  return index_copy<false>(src, dst, idx, outer, n_src, n_idx, inner, dtype, stream);
}

cudaError_t pystage_cuda_scatter_dim1(void* dst, const void* src, const int64_t* idx, int64_t outer, int64_t n_dst,
                                      int64_t n_idx, int64_t inner, int dtype, cudaStream_t stream) {
  return index_copy<true>(src, dst, idx, outer, n_dst, n_idx, inner, dtype, stream);
}

size_t pystage_cuda_bias_grad_workspace_size(int64_t outer, int64_t channels, int64_t inner, int64_t n, int dtype) {
  (void)channels;
  const size_t esize = pystage_cuda_dtype_size(dtype);
  if (esize == 0 || outer <= 0 || inner <= 0 || n <= 0) return 0;
  const BiasPlan p = plan_bias_grad(outer, inner, n);
  if (p.direct) return 0;
  const size_t acc = dtype == PYSTAGE_CUDA_FLOAT64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(p.splits) * static_cast<size_t>(p.per_split) * acc;
}

cudaError_t pystage_cuda_bias_grad(const void* grad, void* out, int64_t outer, int64_t channels, int64_t inner,
                                   int64_t c0, int64_t n, void* workspace, size_t workspace_bytes, int dtype,
                                   cudaStream_t stream) {
  const size_t esize = pystage_cuda_dtype_size(dtype);
  if (esize == 0 || outer < 0 || channels < 0 || inner < 0 || n < 0 || c0 < 0 || c0 + n > channels)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (out == nullptr) return cudaErrorInvalidValue;
  if (outer == 0 || inner == 0) return cudaMemsetAsync(out, 0, static_cast<size_t>(n) * esize, stream);  // empty sum
  if (grad == nullptr) return cudaErrorInvalidValue;
  const BiasPlan p = plan_bias_grad(outer, inner, n);
  const size_t need = pystage_cuda_bias_grad_workspace_size(outer, channels, inner, n, dtype);
  if (workspace_bytes < need || (need > 0 && (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 8 != 0)))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Elem<T>::Acc;
    const T* g = static_cast<const T*>(grad);
    T* o = static_cast<T*>(out);
    A* partial = static_cast<A*>(workspace);
    const dim3 split_grid_y(1, static_cast<unsigned>(p.splits), 1);
    if (p.rows) {
      const dim3 grid(static_cast<unsigned>(n), split_grid_y.y);
      if (p.direct) {
        bias_grad_rows_kernel<T, true><<<grid, kThreads, 0, stream>>>(g, nullptr, o, outer, channels, inner, c0, n,
                                                                      p.rows_per_split);
      } else {
        bias_grad_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(g, partial, o, outer, channels, inner, c0, n,
                                                                       p.rows_per_split);
      }
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(n * inner, 32)), split_grid_y.y);
      bias_grad_cols_kernel<T><<<grid, dim3(32, kColRows), 0, stream>>>(g, partial, outer, channels * inner,
                                                                        c0 * inner, n * inner, p.rows_per_split);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.direct) return err;
    const unsigned blocks = static_cast<unsigned>(ceil_div(n, kThreads / 32));
    bias_grad_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(partial, o, n, p.splits, p.rows ? 1 : inner);
    return cudaGetLastError();
  });
}

size_t pystage_cuda_narrow_copy_bias_workspace_size(int64_t outer, int64_t inner, int64_t n, int dtype) {
  const size_t esize = pystage_cuda_dtype_size(dtype);
  if (esize == 0 || outer <= 0 || inner < kRowsMinInner || n <= 0) return 0;
  const BiasPlan p = plan_bias_grad(outer, inner, n);  // rows layout (inner >= 32)
  if (p.direct) return 0;
  const size_t acc = dtype == PYSTAGE_CUDA_FLOAT64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(p.splits) * static_cast<size_t>(n) * acc;
}

cudaError_t pystage_cuda_narrow_copy_bias(const void* src, void* dst, void* bias, int64_t outer, int64_t channels,
                                          int64_t inner, int64_t c0, int64_t n, void* workspace,
                                          size_t workspace_bytes, int dtype, cudaStream_t stream) {
  const size_t esize = pystage_cuda_dtype_size(dtype);
  if (esize == 0 || outer < 0 || channels < 0 || inner < 0 || n < 0 || c0 < 0 || c0 + n > channels)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (bias != nullptr && inner < kRowsMinInner) return cudaErrorInvalidValue;  // see kernels.h
  if (outer == 0 || inner == 0) {
    return bias == nullptr ? cudaSuccess : cudaMemsetAsync(bias, 0, static_cast<size_t>(n) * esize, stream);
  }
  if (src == nullptr || dst == nullptr) return cudaErrorInvalidValue;
  const BiasPlan p = plan_bias_grad(outer, max64(inner, kRowsMinInner), n);
  const size_t need = bias ? pystage_cuda_narrow_copy_bias_workspace_size(outer, inner, n, dtype) : 0;
  if (workspace_bytes < need || (need > 0 && (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 8 != 0)))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Elem<T>::Acc;
    const T* s = static_cast<const T*>(src);
    T* d = static_cast<T*>(dst);
    T* b = static_cast<T*>(bias);
    A* partial = static_cast<A*>(workspace);
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(p.splits));
    if (b == nullptr) {
      narrow_copy_bias_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(s, d, nullptr, nullptr, outer, channels,
                                                                             inner, c0, n, p.rows_per_split);
    } else if (p.direct) {
      narrow_copy_bias_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(s, d, nullptr, b, outer, channels, inner,
                                                                           c0, n, p.rows_per_split);
    } else {
      narrow_copy_bias_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(s, d, partial, nullptr, outer, channels,
                                                                            inner, c0, n, p.rows_per_split);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || b == nullptr || p.direct) return err;
    const unsigned blocks = static_cast<unsigned>(ceil_div(n, kThreads / 32));
    bias_grad_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(partial, b, n, p.splits, 1);
    return cudaGetLastError();
  });
}

cudaError_t pystage_cuda_pad_dim1(const void* src, void* dst, int64_t outer, int64_t n, int64_t channels,
                                  int64_t inner, int64_t c0, int dtype, cudaStream_t stream) {
  const int64_t esize = static_cast<int64_t>(pystage_cuda_dtype_size(dtype));
  if (esize == 0 || outer < 0 || n < 0 || channels < 0 || inner < 0 || c0 < 0 || c0 + n > channels)
    return cudaErrorInvalidValue;
  if (outer == 0 || channels == 0 || inner == 0) return cudaSuccess;
  if (dst == nullptr || (n > 0 && src == nullptr)) return cudaErrorInvalidValue;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  return dispatch_unit(inner * esize, align, [&](auto unit, int64_t ubytes) {
    using U = decltype(unit);
    const int64_t inner_u = inner * esize / ubytes;
    const int64_t total = outer * channels * inner_u;
    const unsigned blocks = static_cast<unsigned>(min64(ceil_div(total, kThreads), kMaxBlocks));
    const U* s = static_cast<const U*>(src);
    U* d = static_cast<U*>(dst);
    if (total < (int64_t{1} << 31)) {  // uint32 math: e + step stays below 2^32
      pad_dim1_kernel<U, uint32_t><<<blocks, kThreads, 0, stream>>>(
          s, d, static_cast<uint32_t>(n), static_cast<uint32_t>(channels), static_cast<uint32_t>(inner_u),
          static_cast<uint32_t>(c0), static_cast<uint32_t>(total));
    } else {
      pad_dim1_kernel<U, int64_t><<<blocks, kThreads, 0, stream>>>(s, d, n, channels, inner_u, c0, total);
    }
    return cudaGetLastError();
  });
}

cudaError_t pystage_cuda_block_triangular_mask(void* weight, int64_t out, int64_t in, int64_t inner,
                                               const int64_t* out_ends, const int64_t* in_ends, int64_t steps,
                                               int dtype, cudaStream_t stream) {
  const int64_t esize = static_cast<int64_t>(pystage_cuda_dtype_size(dtype));
  if (esize == 0 || out < 0 || in < 0 || inner < 0 || steps < 0) return cudaErrorInvalidValue;
  if (out == 0 || in == 0 || inner == 0) return cudaSuccess;
  if (steps == 0 || weight == nullptr || out_ends == nullptr || in_ends == nullptr) return cudaErrorInvalidValue;
  return dispatch_unit(inner * esize, reinterpret_cast<uintptr_t>(weight), [&](auto unit, int64_t ubytes) {
    using U = decltype(unit);
    const int64_t inner_u = inner * esize / ubytes;
    const int64_t row_u = in * inner_u;
    const dim3 grid(static_cast<unsigned>(min64(out, kMaxBlocks)),
                    static_cast<unsigned>(min64(ceil_div(row_u, kThreads), 64)));
    block_triangular_mask_kernel<U><<<grid, kThreads, 0, stream>>>(static_cast<U*>(weight), out, in, inner_u, out_ends,
                                                                   in_ends, steps);
    return cudaGetLastError();
  });
}

}  // extern "C"
