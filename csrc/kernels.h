// The device-specific pieces of the masked ops.
//
// The masked ops are written once (masked_impl.h, masked_backward.h) against ATen GEMMs and convolutions,
// which dispatch to MKL/oneDNN on CPU and cuBLAS/cuDNN on CUDA. What ATen does not offer as one call lives
// behind this table: CPU versions in cpu/kernels.cpp, CUDA versions in cuda/glue.cpp over the plain kernels
// in cuda/kernels.cu. Tensors are viewed as (outer, n, inner) along dim 1.
#pragma once

#include <ATen/ATen.h>

namespace pystage {

struct DeviceKernels {
  // src viewed as (outer, n_src, inner) -> (outer, idx.numel(), inner), picking idx along dim 1.
  at::Tensor (*gather_dim1)(const at::Tensor& src, const at::Tensor& idx) = nullptr;
  // dst viewed as (outer, n_dst, inner): dst[:, idx[j], :] = src[:, j, :]. dst is written in place.
  void (*scatter_dim1)(const at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src) = nullptr;
  // grad viewed as (outer, channels, inner): sum over outer and inner of channels [c0, c0 + n).
  at::Tensor (*bias_grad)(const at::Tensor& grad, int64_t c0, int64_t n) = nullptr;
  // weight viewed as (out, in, inner): zero w[o, i] where step(i) > step(o); bounds are cumulative ends.
  void (*block_triangular_mask)(const at::Tensor& weight, c10::IntArrayRef out_ends, c10::IntArrayRef in_ends) = nullptr;
  // Channels [c0, c0 + n) of src as a new contiguous tensor (src's shape with dim 1 = n); when `bias` is not null
  // it also receives their sum over outer and inner (the bias gradient), read in the same pass where the device can.
  at::Tensor (*narrow_copy_dim1)(const at::Tensor& src, int64_t c0, int64_t n, at::Tensor* bias) = nullptr;
  // A new contiguous tensor of src's shape with dim 1 = channels: channels [c0, c0 + src.size(1)) hold src, the
  // others zero; every element written once.
  at::Tensor (*pad_dim1)(const at::Tensor& src, int64_t channels, int64_t c0) = nullptr;
  // Optional (nullptr: ATen only). Direct conv2d backward for a few trainable units: when it applies, allocates and
  // fills *gw (T, in_active, kh, kw) and *gx (zero but channels [in_split, in_active)), either may be null, and returns
  // true; returns false (allocating nothing) when it does not apply.
  bool (*conv2d_grads_direct)(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w_train, int64_t in_split,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor* gx,
                              at::Tensor* gw) = nullptr;
  // Optional (nullptr: mm + bias_grad). gy (B, T) and x (B, in) may be column blocks of wider row-major matrices:
  // *gw = gy^T @ x and *gb = gy summed over B in one library call (the bias folded into the GEMM's reduction over
  // B). Returns false, allocating nothing, where the library cannot do it for these operands.
  bool (*linear_wgrad_bias)(const at::Tensor& gy, const at::Tensor& x, at::Tensor* gw, at::Tensor* gb) = nullptr;
};

const DeviceKernels& cpu_kernels();

bool conv2d_grads_direct(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w_train, int64_t in_split,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor* gx,
                         at::Tensor* gw);

}  // namespace pystage
