/* The CUDA kernels of pystage behind a plain C interface.
 *
 * kernels.cu includes no ATen/torch header: it compiles with nvcc alone, and
 * glue.cpp (plain C++, compiled by the host compiler) wraps these functions
 * into the pystage::DeviceKernels table that the generic op bodies call.
 *
 * Conventions shared by every function:
 *  - Tensors are passed as raw device pointers to CONTIGUOUS storage, viewed as
 *    (outer, n, inner) along "dim 1" (inner = product of the dims after dim 1).
 *  - `dtype` is a pystage_cuda_dtype code; element type of every data pointer.
 *  - Index arrays are int64 on the device of the data. Indices are validated by
 *    the caller (range, no repeats); the kernels never read or write out of
 *    bounds on a bad index (gather writes 0 for it, scatter skips it).
 *  - Work is enqueued on `stream`; nothing synchronises. The return value is
 *    cudaSuccess, cudaErrorInvalidValue for bad arguments (unknown dtype, too
 *    small workspace, negative sizes), or the launch error.
 *  - Empty problems (a zero size) launch nothing and return cudaSuccess.
 */
#ifndef PYSTAGE_CUDA_KERNELS_H_
#define PYSTAGE_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types. Keep the values stable: glue.cpp maps at::ScalarType to these. */
typedef enum pystage_cuda_dtype {
  PYSTAGE_CUDA_FLOAT32 = 0,  /* float */
  PYSTAGE_CUDA_FLOAT64 = 1,  /* double */
  PYSTAGE_CUDA_FLOAT16 = 2,  /* __half */
  PYSTAGE_CUDA_BFLOAT16 = 3, /* __nv_bfloat16 */
} pystage_cuda_dtype;

/* Bytes per element of `dtype`, 0 for an unknown code. */
size_t pystage_cuda_dtype_size(int dtype);

/* dst (outer, n_idx, inner) = src (outer, n_src, inner)[:, idx, :]. */
cudaError_t pystage_cuda_gather_dim1(const void* src, void* dst, const int64_t* idx, int64_t outer, int64_t n_src,
                                     int64_t n_idx, int64_t inner, int dtype, cudaStream_t stream);

/* dst (outer, n_dst, inner)[:, idx[j], :] = src (outer, n_idx, inner)[:, j, :]; other rows of dst untouched. */
cudaError_t pystage_cuda_scatter_dim1(void* dst, const void* src, const int64_t* idx, int64_t outer, int64_t n_dst,
                                      int64_t n_idx, int64_t inner, int dtype, cudaStream_t stream);

/* out[k] = sum over o < outer, i < inner of grad (outer, channels, inner)[o, c0 + k, i], for k < n.
 * Accumulates in float (float32/float16/bfloat16) or double (float64), deterministically (no atomics):
 * a first pass writes per-split partial sums to `workspace`, a second pass adds them up per channel.
 * `workspace` must hold pystage_cuda_bias_grad_workspace_size(...) bytes (may be NULL when that is 0),
 * aligned to 8 bytes, on the device of `grad`. */
size_t pystage_cuda_bias_grad_workspace_size(int64_t outer, int64_t channels, int64_t inner, int64_t n, int dtype);
cudaError_t pystage_cuda_bias_grad(const void* grad, void* out, int64_t outer, int64_t channels, int64_t inner,
                                   int64_t c0, int64_t n, void* workspace, size_t workspace_bytes, int dtype,
                                   cudaStream_t stream);

/* dst (outer, n, inner) = src (outer, channels, inner)[:, c0 : c0 + n, :], and, when `bias` is not NULL,
 * bias[k] = sum over o, i of those values (accumulated as pystage_cuda_bias_grad does, deterministically): one
 * pass over the channel block writes the contiguous copy and the bias gradient. Needs inner >= 32 (every
 * lane of a warp on one contiguous run; the caller copies smaller maps with a plain copy) when bias is given.
 * `workspace`: pystage_cuda_narrow_copy_bias_workspace_size(...) bytes (NULL when 0), 8-byte aligned. */
size_t pystage_cuda_narrow_copy_bias_workspace_size(int64_t outer, int64_t inner, int64_t n, int dtype);
cudaError_t pystage_cuda_narrow_copy_bias(const void* src, void* dst, void* bias, int64_t outer, int64_t channels,
                                          int64_t inner, int64_t c0, int64_t n, void* workspace,
                                          size_t workspace_bytes, int dtype, cudaStream_t stream);

/* dst (outer, channels, inner) = src (outer, n, inner) placed at channels [c0, c0 + n), zeros elsewhere: every
 * element of dst written once (no memset first). Requires c0 + n <= channels. */
cudaError_t pystage_cuda_pad_dim1(const void* src, void* dst, int64_t outer, int64_t n, int64_t channels,
                                  int64_t inner, int64_t c0, int dtype, cudaStream_t stream);

/* weight (out, in, inner), in place: zero weight[o, i, :] where step(i) > step(o).
 * `out_ends`, `in_ends`: DEVICE arrays of `steps` (>= 1) int64, the cumulative unit counts after each growth
 * step (non-decreasing, ending at out and in; validated by the caller). Row o belongs to the first step s
 * with out_ends[s] > o and keeps columns [0, in_ends[s]). The arrays must stay alive until the kernel ran
 * (stream order: a caching-allocator buffer freed after this call is fine). */
cudaError_t pystage_cuda_block_triangular_mask(void* weight, int64_t out, int64_t in, int64_t inner,
                                               const int64_t* out_ends, const int64_t* in_ends, int64_t steps,
                                               int dtype, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* PYSTAGE_CUDA_KERNELS_H_ */
