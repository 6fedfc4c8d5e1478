// The device-specific pieces of the masked ops.
//
// The masked ops are written once (masked_impl.h) against ATen GEMMs and
// convolutions, which dispatch to MKL/oneDNN on CPU and cuBLAS/cuDNN on CUDA.
// What ATen does not offer as one call lives behind this table: CPU versions in
// cpu/kernels.cpp, CUDA versions in cuda/glue.cpp over the plain kernels in
// cuda/kernels.cu.
#pragma once

#include <ATen/ATen.h>

namespace pystage {

struct DeviceKernels {
  // src viewed as (outer, n_src, inner) -> (outer, idx.numel(), inner), picking idx along dim 1.
  at::Tensor (*gather_dim1)(const at::Tensor& src, const at::Tensor& idx);
  // dst viewed as (outer, n_dst, inner): dst[:, idx[j], :] = src[:, j, :]. dst is written in place.
  void (*scatter_dim1)(const at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src);
  // grad viewed as (outer, channels, inner): sum over outer and inner of channels [c0, c0 + n).
  at::Tensor (*bias_grad)(const at::Tensor& grad, int64_t c0, int64_t n);
  // weight viewed as (out, in, inner): zero w[o, i] where step(i) > step(o); bounds are cumulative ends.
  void (*block_triangular_mask)(const at::Tensor& weight, c10::IntArrayRef out_ends, c10::IntArrayRef in_ends);
  // Optional (nullptr: ATen only). Direct conv2d backward for a few trainable units: when it applies, allocates and
  // fills *gw (T, in_active, kh, kw) and *gx (zero but channels [in_split, in_active)), either may be null, and returns
  // true; returns false (allocating nothing) when it does not apply.
  bool (*conv2d_grads_direct)(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w_train, int64_t in_split,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor* gx,
                              at::Tensor* gw) = nullptr;
};

const DeviceKernels& cpu_kernels();

bool conv2d_grads_direct(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w_train, int64_t in_split,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor* gx,
                         at::Tensor* gw);

}  // namespace pystage
