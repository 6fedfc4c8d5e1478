// CPU versions of the device-specific pieces (see kernels.h).
#include <ATen/AccumulateType.h>

#include "kernels.h"

namespace pystage {
namespace {

at::Tensor as3(const at::Tensor& t) {  // (outer, n, inner); explicit inner, so empty tensors view too
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return t.view({t.size(0), t.size(1), inner});
}

std::vector<int64_t> with_dim1(const at::Tensor& t, int64_t n) {
  auto shape = t.sizes().vec();
  shape[1] = n;
  return shape;
}

at::Tensor gather_dim1(const at::Tensor& src, const at::Tensor& idx) { return src.index_select(1, idx); }

void scatter_dim1(const at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src) { dst.index_copy_(1, idx, src); }

at::Tensor bias_grad(const at::Tensor& grad, int64_t c0, int64_t n) {
  auto g = as3(grad).narrow(1, c0, n);  // (outer, n, inner)
  const auto s = grad.scalar_type();
  if (s == at::kHalf || s == at::kBFloat16) return g.sum(at::IntArrayRef{0, 2}, /*keepdim=*/false, at::kFloat).to(s);
  return g.sum(at::IntArrayRef{0, 2});  // float/double: ATen's reduction already accumulates safely (cascade sum)
}

at::Tensor narrow_copy_dim1(const at::Tensor& src, int64_t c0, int64_t n, at::Tensor* bias) {
  auto out = at::empty(with_dim1(src, n), src.options());
  out.copy_(src.narrow(1, c0, n));  // empty + copy_: several times faster than .contiguous() on a channel slice
  if (bias) *bias = bias_grad(out, 0, n);  // from the copy, which is hot in cache
  return out;
}

at::Tensor pad_dim1(const at::Tensor& src, int64_t channels, int64_t c0) {
  auto out = at::empty(with_dim1(src, channels), src.options());
  const int64_t n = src.size(1), tail = channels - c0 - n;
  if (c0 > 0) out.narrow(1, 0, c0).zero_();
  out.narrow(1, c0, n).copy_(src);
  if (tail > 0) out.narrow(1, c0 + n, tail).zero_();
  return out;
}

void block_triangular_mask(const at::Tensor& weight, c10::IntArrayRef out_ends, c10::IntArrayRef in_ends) {
  // Rows of step s keep columns of steps <= s: zero columns [in_ends[s], in) on rows [out_ends[s-1], out_ends[s]).
  int64_t row0 = 0;
  const int64_t in = weight.size(1);
  for (size_t s = 0; s < out_ends.size(); ++s) {
    const int64_t rows = out_ends[s] - row0, col0 = in_ends[s];
    if (rows > 0 && col0 < in) weight.narrow(0, row0, rows).narrow(1, col0, in - col0).zero_();
    row0 = out_ends[s];
  }
}

DeviceKernels make_cpu_kernels() {
  DeviceKernels k;
  k.gather_dim1 = &gather_dim1;
  k.scatter_dim1 = &scatter_dim1;
  k.bias_grad = &bias_grad;
  k.block_triangular_mask = &block_triangular_mask;
  k.narrow_copy_dim1 = &narrow_copy_dim1;
  k.pad_dim1 = &pad_dim1;
  k.conv2d_grads_direct = &conv2d_grads_direct;
  return k;
}

}  // namespace

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels k = make_cpu_kernels();
  return k;
}

}  // namespace pystage
