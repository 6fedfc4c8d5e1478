// CPU versions of the device-specific pieces (see kernels.h).
#include <ATen/AccumulateType.h>

#include "kernels.h"

namespace pystage {
namespace {

at::Tensor as3(const at::Tensor& t) { return t.view({t.size(0), t.size(1), -1}); }  // (outer, n, inner)

at::Tensor gather_dim1(const at::Tensor& src, const at::Tensor& idx) { return src.index_select(1, idx); }

void scatter_dim1(const at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src) { dst.index_copy_(1, idx, src); }

at::Tensor bias_grad(const at::Tensor& grad, int64_t c0, int64_t n) {
  auto g = as3(grad).narrow(1, c0, n);  // (outer, n, inner)
  const auto s = grad.scalar_type();
  if (s == at::kHalf || s == at::kBFloat16) return g.sum(at::IntArrayRef{0, 2}, /*keepdim=*/false, at::kFloat).to(s);
  return g.sum(at::IntArrayRef{0, 2});  // float/double: ATen's reduction already accumulates safely (cascade sum)
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

}  // namespace

const DeviceKernels& cpu_kernels() {
  static const DeviceKernels k{&gather_dim1, &scatter_dim1, &bias_grad, &block_triangular_mask, &conv2d_grads_direct};
  return k;
}

}  // namespace pystage
