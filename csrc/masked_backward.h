// Backward of masked_linear / masked_conv2d, written once for every device, in two paths:
//
//  * masked (least work): dW/db of the trainable block and dX of the trainable inputs only, from strided
//    views of grad_out and x where the library takes them (cuBLAS/MKL GEMMs take a leading dimension, so a
//    column block of a row-major matrix is free; convolutions need channel blocks contiguous, so the
//    trainable slice of grad_out is copied once and its bias gradient summed in that same pass).
//  * dense (dense-then-discard): the dense layer's own backward call on the full shapes, with a weight that
//    is w_train padded with zeros, then the trainable rows kept. Costs what a dense backward costs; wins
//    where the masked shapes are too small or too odd for the libraries' kernels (launch-bound GPUs).
//
// Both return the same gradients (up to the summation order inside the libraries): zero dX outside
// [in_split, in_active), and nothing for frozen units. `path` picks one; pystage/autotune.py measures both
// once per shape, dtype and device and caches the faster.
#pragma once

#include <vector>

#include "masked_impl.h"

namespace pystage {

enum class BackwardPath : int64_t {
  kMasked = 0,     // least work
  kDense = 1,      // dense-then-discard
  kFusedBias = 2,  // masked, with db folded into the dW GEMM where the device's library can (linear); else kMasked
};

inline BackwardPath check_path(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "pystage: path must be 0 (masked), 1 (dense-then-discard) or 2 (masked, bias "
              "gradient fused into the weight GEMM), got ", path);
  return static_cast<BackwardPath>(path);
}

inline void check_backward_common(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_train,
                                  int64_t in_split, int64_t out_frozen) {
  check_same(grad_out, "grad_out", x, "x");
  check_same(w_train, "w_train", x, "x");
  check_contiguous(grad_out, "grad_out");
  check_contiguous(x, "x");
  check_contiguous(w_train, "w_train");
  TORCH_CHECK(w_train.size(0) > 0, "pystage: w_train has 0 rows: nothing is trainable, backward has nothing to compute");
  check_range(w_train.size(1), "w_train.size(1) (active inputs)", 1, x.size(1), "inputs of x the trainable units read");
  check_range(in_split, "in_split", 0, w_train.size(1), "first input unit that is trainable in the layer below");
  check_range(out_frozen, "out_frozen", 0, grad_out.size(1) - 1, "frozen output units before the trainable block");
  check_range(out_frozen + w_train.size(0), "out_frozen + trainable units", 1, grad_out.size(1),
              "at most the output width of grad_out");
  check_dim_size(grad_out, "grad_out", 0, x.size(0), "one gradient row per sample of x");
}

// An empty batch: every gradient is an empty sum, i.e. zero.
inline Grads zero_grads(const at::Tensor& x, const at::Tensor& w_train, std::array<bool, 3> mask) {
  return pack_grads(x, mask, at::zeros_like(x), at::zeros_like(w_train), at::zeros({w_train.size(0)}, x.options()));
}

// w_train's inputs [in_split, in_active) at rows [F, F + T) of an (out, C, ...) zero weight: the dense weight as far
// as dX of the trainable inputs is concerned (frozen units never read them, rule 2).
inline at::Tensor padded_weight(const at::Tensor& w_train, int64_t out, int64_t channels, int64_t F, int64_t in_split) {
  auto shape = w_train.sizes().vec();
  shape[0] = out;
  shape[1] = channels;
  auto w = at::zeros(shape, w_train.options());
  const int64_t n_in = w_train.size(1) - in_split;
  if (n_in > 0) w.narrow(0, F, w_train.size(0)).narrow(1, in_split, n_in).copy_(w_train.narrow(1, in_split, n_in));
  return w;
}

// ------------------------------------------------------------------------------------------------ linear

inline Grads linear_backward_masked(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& w_train, int64_t in_split, int64_t F, std::array<bool, 3> mask,
                                    bool fuse_bias) {
  const int64_t T = w_train.size(0), in_active = w_train.size(1), n_in = in_active - in_split, C = x.size(1);
  auto gy = grad_out.narrow(1, F, T);  // (B, T), row stride = out_features: a cuBLAS operand with ld = out
  auto xa = x.narrow(1, 0, in_active);  // (B, in_active), ld = C
  at::Tensor gx, gw, gb;
  if (mask[0]) {
    if (n_in == C) {
      gx = at::mm(gy, w_train);
    } else {
      gx = at::empty_like(x);
      if (in_split > 0) gx.narrow(1, 0, in_split).zero_();
      if (n_in > 0) {
        auto gx_in = gx.narrow(1, in_split, n_in);  // (B, n_in), written in place with ld = C
        at::mm_out(gx_in, gy, w_train.narrow(1, in_split, n_in));
      }
      if (in_active < C) gx.narrow(1, in_active, C - in_active).zero_();
    }
  }
  const bool fused = fuse_bias && mask[1] && mask[2] && k.linear_wgrad_bias && k.linear_wgrad_bias(gy, xa, &gw, &gb);
  if (!fused) {
    if (mask[1]) gw = at::mm(gy.t(), xa);  // (T, in_active)
    if (mask[2]) gb = k.bias_grad(grad_out, F, T);
  }
  return pack_grads(x, mask, gx, gw, gb);
}

inline Grads linear_backward_dense(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_train,
                                   int64_t in_split, int64_t F, std::array<bool, 3> mask) {
  const int64_t T = w_train.size(0), in_active = w_train.size(1), out = grad_out.size(1), C = x.size(1);
  at::Tensor gx, gw, gb;
  if (mask[0]) gx = at::mm(grad_out, padded_weight(w_train, out, C, F, in_split));  // (B, C)
  if (mask[1]) gw = at::mm(grad_out.t(), x).narrow(0, F, T).narrow(1, 0, in_active).clone(at::MemoryFormat::Contiguous);
  if (mask[2]) gb = grad_out.sum(0).narrow(0, F, T).clone();
  return pack_grads(x, mask, gx, gw, gb);
}

// Returns (grad_x, grad_w_train, grad_b_train); an entry whose output_mask bit is off is an empty tensor.
inline Grads masked_linear_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& w_train, int64_t in_split, int64_t out_frozen,
                                    std::array<bool, 3> mask, int64_t path) {
  check_rank(grad_out, "grad_out", 2, "(batch, out_features)");
  check_rank(x, "x", 2, "(batch, in_features)");
  check_rank(w_train, "w_train", 2, "(trainable_units, in_active)");
  check_backward_common(grad_out, x, w_train, in_split, out_frozen);
  const auto p = check_path(path);
  if (x.size(0) == 0) return zero_grads(x, w_train, mask);
  if (p == BackwardPath::kDense) return linear_backward_dense(grad_out, x, w_train, in_split, out_frozen, mask);
  return linear_backward_masked(k, grad_out, x, w_train, in_split, out_frozen, mask, p == BackwardPath::kFusedBias);
}

// ------------------------------------------------------------------------------------------------ conv2d

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bw(const at::Tensor& gy, const at::Tensor& x,
                                                             const at::Tensor& w, const ConvArgs& c,
                                                             std::array<bool, 3> mask) {
  c10::optional<at::IntArrayRef> bias_sizes;
  const std::vector<int64_t> nb{gy.size(1)};
  if (mask[2]) bias_sizes = at::IntArrayRef(nb);
  return at::convolution_backward(gy, x, w, bias_sizes, c.stride, c.padding, c.dilation, false, {0, 0}, 1, mask);
}

inline Grads conv2d_backward_masked(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& w_train, int64_t in_split, int64_t F, const ConvArgs& c,
                                    std::array<bool, 3> mask) {
  const int64_t T = w_train.size(0), in_active = w_train.size(1), n_in = in_active - in_split, C = x.size(1);
  const bool one_block = F == 0 && T == grad_out.size(1);  // grad_out is the trainable block's gradient
  at::Tensor gy = grad_out, gx, gw, gb;
  // Convolutions want the channel block contiguous: one pass copies it and, when wanted, sums db.
  if (!one_block) gy = k.narrow_copy_dim1(grad_out, F, T, mask[2] ? &gb : nullptr);  // (B, T, Ho, Wo)
  const bool bias_in_call = mask[2] && one_block;  // db from the convolution call itself
  if (k.conv2d_grads_direct && (mask[0] || mask[1])) {  // few trainable units on CPU: skip oneDNN's fixed costs
    at::Tensor dx, dw;  // allocated by the kernel when it applies
    if (k.conv2d_grads_direct(gy, x, w_train, in_split, c.stride, c.padding, c.dilation, mask[0] ? &dx : nullptr,
                              mask[1] ? &dw : nullptr)) {
      if (bias_in_call) gb = k.bias_grad(gy, 0, T);
      return pack_grads(x, mask, dx, dw, gb);
    }
  }
  if (n_in == C) {  // dX of every input: exactly the dense call on the trainable block
    if (mask[0] || mask[1] || bias_in_call) {
      at::Tensor b;
      std::tie(gx, gw, b) = conv_bw(gy, x, w_train, c, {mask[0], mask[1], bias_in_call});
      if (bias_in_call) gb = b;
    }
    return pack_grads(x, mask, gx, gw, gb);
  }
  if (mask[1] || bias_in_call) {
    at::Tensor b;
    std::tie(std::ignore, gw, b) = conv_bw(gy, x.narrow(1, 0, in_active), w_train, c, {false, mask[1], bias_in_call});
    if (bias_in_call) gb = b;
  }
  if (mask[0]) {
    if (n_in == 0) {
      gx = at::zeros_like(x);
    } else {
      auto w_in = w_train;
      if (n_in < in_active) {
        w_in = w_train.narrow(1, in_split, n_in);
        w_in = at::empty(w_in.sizes(), w_in.options()).copy_(w_in);  // weights: small
      }
      auto shape = x.sizes().vec();
      shape[1] = n_in;
      // dgrad reads only the input's shape: an unfilled tensor of it, not a strided view (which would be copied)
      auto gxi = std::get<0>(conv_bw(gy, at::empty(shape, x.options()), w_in, c, {true, false, false}));
      gx = k.pad_dim1(gxi, C, in_split);  // zeros outside [in_split, in_active), each element written once
    }
  }
  return pack_grads(x, mask, gx, gw, gb);
}

inline Grads conv2d_backward_dense(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_train,
                                   int64_t in_split, int64_t F, const ConvArgs& c, std::array<bool, 3> mask) {
  const int64_t T = w_train.size(0), in_active = w_train.size(1), out = grad_out.size(1), C = x.size(1);
  at::Tensor w;
  if (mask[0]) {
    w = padded_weight(w_train, out, C, F, in_split);
  } else {  // the weight gradient reads only the weight's shape
    auto shape = w_train.sizes().vec();
    shape[0] = out;
    shape[1] = C;
    w = at::empty(shape, w_train.options());
  }
  auto [gx, gw_full, gb_full] = conv_bw(grad_out, x, w, c, mask);
  at::Tensor gw, gb;
  if (mask[1]) gw = gw_full.narrow(0, F, T).narrow(1, 0, in_active).clone(at::MemoryFormat::Contiguous);
  if (mask[2]) gb = gb_full.narrow(0, F, T).clone();
  return pack_grads(x, mask, gx, gw, gb);
}

inline Grads masked_conv2d_backward(const DeviceKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& w_train, int64_t in_split, int64_t out_frozen, const ConvArgs& c,
                                    std::array<bool, 3> mask, int64_t path) {
  check_rank(grad_out, "grad_out", 4, "(batch, out_channels, height, width)");
  check_rank(x, "x", 4, "(batch, channels, height, width)");
  check_rank(w_train, "w_train", 4, "(trainable_units, in_active, kh, kw)");
  check_conv_args(c);
  check_backward_common(grad_out, x, w_train, in_split, out_frozen);
  for (int d = 0; d < 2; ++d) {
    const int64_t kk = w_train.size(2 + d),
                  expect = (x.size(2 + d) + 2 * c.padding[d] - c.dilation[d] * (kk - 1) - 1) / c.stride[d] + 1;
    check_dim_size(grad_out, "grad_out", 2 + d, expect, "the conv output size for x, the kernel and stride/padding/dilation");
  }
  const auto p = check_path(path);
  if (x.size(0) == 0) return zero_grads(x, w_train, mask);
  if (p == BackwardPath::kDense) return conv2d_backward_dense(grad_out, x, w_train, in_split, out_frozen, c, mask);
  return conv2d_backward_masked(k, grad_out, x, w_train, in_split, out_frozen, c, mask);
}

}  // namespace pystage
