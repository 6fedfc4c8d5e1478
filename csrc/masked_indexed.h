// The general path of the masked ops: an arbitrary set of trainable output
// units (out_index) and of input units whose gradient is wanted (in_index).
//
// Layout: `weight` holds every unit's weights (frozen values; the rows named by
// out_index are ignored), `w_train` holds the trainable rows, in out_index
// order. Forward runs the dense layer, then overwrites the trainable units
// (scatter). Backward gathers the trainable units' output gradient, computes
// dW/db for them only, and dX only for the inputs in in_index:
//   cost ~ T * in + out * K instead of 2 * out * in.
#pragma once

#include "masked_impl.h"

namespace pystage {

inline void check_indexed(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& w_train, const c10::optional<at::Tensor>& b_train, const at::Tensor& out_index) {
  check_float_dtype(x, "x");
  check_same(weight, "weight", x, "x");
  check_same(w_train, "w_train", x, "x");
  check_contiguous(x, "x");
  check_contiguous(weight, "weight");
  check_contiguous(w_train, "w_train");
  check_dim_size(weight, "weight", 1, x.size(1), "one weight per input unit of x");
  for (int64_t d = 1; d < weight.dim(); ++d)
    check_dim_size(w_train, "w_train", d, weight.size(d), "trainable rows have the shape of weight's rows");
  check_index(out_index, "out_index", weight.size(0), x, /*allow_empty=*/false);
  check_dim_size(w_train, "w_train", 0, out_index.numel(), "one row per entry of out_index");
  check_bias(bias, "bias", weight.size(0), x);
  check_bias(b_train, "b_train", out_index.numel(), x);
  TORCH_CHECK(bias.has_value() == b_train.has_value(), "pystage: bias and b_train must both be given or both be None");
}

inline at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, const ConvArgs* c) {
  return c ? conv(x, w, b, *c) : at::linear(x, w, b);
}

inline at::Tensor masked_indexed_forward(const DeviceKernels& k, const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias, const at::Tensor& w_train,
                                         const c10::optional<at::Tensor>& b_train, const at::Tensor& out_index,
                                         const ConvArgs* c) {
  check_indexed(x, weight, bias, w_train, b_train, out_index);
  auto y = dense(x, weight, bias, c);  // (B, out[, Ho, Wo])
  k.scatter_dim1(y, out_index, dense(x, w_train, b_train, c));
  return y;
}

inline Grads masked_indexed_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& w_train, const at::Tensor& out_index,
                                     const at::Tensor& in_index, const ConvArgs* c, std::array<bool, 3> mask) {
  check_same(grad_out, "grad_out", x, "x");
  check_contiguous(grad_out, "grad_out");
  check_indexed(x, weight, c10::nullopt, w_train, c10::nullopt, out_index);
  check_index(in_index, "in_index", x.size(1), x, /*allow_empty=*/true);
  check_dim_size(grad_out, "grad_out", 1, weight.size(0), "one gradient per output unit");
  auto gy = k.gather_dim1(grad_out, out_index);  // (B, T[, Ho, Wo])
  const std::vector<int64_t> out_pad{0, 0};
  at::Tensor gx, gw, gb;
  if (mask[1]) {
    gw = c ? std::get<1>(at::convolution_backward(gy, x, w_train, c10::nullopt, c->stride, c->padding, c->dilation, false,
                                                  out_pad, 1, {false, true, false}))
           : at::mm(gy.t(), x);
  }
  if (mask[2]) gb = k.bias_grad(gy, 0, gy.size(1));
  if (mask[0]) {
    gx = at::zeros_like(x);
    const int64_t K = in_index.numel();
    if (K > 0) {
      auto w_in = k.gather_dim1(weight, in_index);  // (out, K[, kh, kw])
      k.scatter_dim1(w_in.view({1, w_in.size(0), -1}), out_index, k.gather_dim1(w_train, in_index).view({1, gy.size(1), -1}));
      at::Tensor gxk;
      if (c) {
        auto shape = x.sizes().vec();
        shape[1] = K;
        gxk = std::get<0>(at::convolution_backward(grad_out, at::empty(shape, x.options()), w_in, c10::nullopt, c->stride,
                                                   c->padding, c->dilation, false, out_pad, 1, {true, false, false}));
      } else {
        gxk = at::mm(grad_out, w_in);  // (B, K)
      }
      k.scatter_dim1(gx, in_index, gxk);
    }
  }
  return pack_grads(x, mask, gx, gw, gb);
}

}  // namespace pystage
