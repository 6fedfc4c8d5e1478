// Autograd of masked_linear / masked_conv2d, in C++ (TORCH_LIBRARY_IMPL for the Autograd key).
//
// In C++ rather than torch.library.register_autograd so that a call costs what a dense layer's call costs:
// the Python autograd wrapper adds ~30-100 us of host time per forward and per backward, which on a GPU is
// as long as the kernels of a small layer. Forward runs the op below autograd and saves x and w_train;
// backward asks backward_paths.h which path to run (masked or dense-then-discard, picked once per shape)
// and calls the backward op. The fake (meta) kernels stay in pystage/ops.py; the indexed ops keep their
// Python autograd there (no per-step cost target).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "backward_paths.h"

namespace pystage {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

c10::OperatorHandle schema(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// Edge (index among the tensor inputs that are defined) of x, w_train and b_train: what needs_input_grad takes.
void save_edges(AutogradContext* ctx, const OptTensor& b_frozen, const OptTensor& b_train) {
  const bool bf = b_frozen.has_value() && b_frozen->defined();
  const int64_t wt = 2 + bf;
  ctx->saved_data["edge_w"] = wt;
  ctx->saved_data["edge_b"] = (b_train.has_value() && b_train->defined()) ? wt + 1 : int64_t{-1};
}

std::array<bool, 3> output_mask(AutogradContext* ctx) {
  const int64_t eb = ctx->saved_data["edge_b"].toInt();
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(ctx->saved_data["edge_w"].toInt()),
          eb >= 0 && ctx->needs_input_grad(eb)};
}

// Grads in forward-argument order (x, w_frozen, b_frozen, w_train, b_train, then n_rest non-tensor arguments).
variable_list by_argument(std::array<bool, 3> mask, const Grads3& g, size_t n_rest) {
  variable_list out(5 + n_rest);
  if (mask[0]) out[0] = std::get<0>(g);
  if (mask[1]) out[3] = std::get<1>(g);
  if (mask[2]) out[4] = std::get<2>(g);
  return out;
}

struct MaskedLinearFn : public torch::autograd::Function<MaskedLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_frozen,
                            const OptTensor& b_frozen, const at::Tensor& w_train, const OptTensor& b_train,
                            int64_t in_split, int64_t out_features, at::IntArrayRef frozen_rows,
                            at::IntArrayRef frozen_cols) {
    static auto op = schema("pystage::masked_linear")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                           const OptTensor&, int64_t, int64_t, at::IntArrayRef, at::IntArrayRef)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = op.call(x, w_frozen, b_frozen, w_train, b_train, in_split, out_features, frozen_rows, frozen_cols);
    ctx->save_for_backward({x, w_train});
    ctx->saved_data["in_split"] = in_split;
    ctx->saved_data["out_frozen"] = w_frozen.size(0);
    save_edges(ctx, b_frozen, b_train);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = schema("pystage::masked_linear_backward")
                         .typed<Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                       std::array<bool, 3>, int64_t)>();
    const auto mask = output_mask(ctx);
    if (!mask[0] && !mask[1] && !mask[2]) return variable_list(9);
    const auto saved = ctx->get_saved_variables();
    const int64_t in_split = ctx->saved_data["in_split"].toInt(), out_frozen = ctx->saved_data["out_frozen"].toInt();
    const auto g = grads[0].contiguous();
    const int64_t path = backward_path("masked_linear", g, saved[0], saved[1], in_split, out_frozen, {}, {}, {}, mask);
    return by_argument(mask, op.call(g, saved[0], saved[1], in_split, out_frozen, mask, path), 4);
  }
};

struct MaskedConv2dFn : public torch::autograd::Function<MaskedConv2dFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_frozen,
                            const OptTensor& b_frozen, const at::Tensor& w_train, const OptTensor& b_train,
                            int64_t in_split, int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, at::IntArrayRef frozen_rows, at::IntArrayRef frozen_cols) {
    static auto op = schema("pystage::masked_conv2d")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                           const OptTensor&, int64_t, int64_t, at::IntArrayRef, at::IntArrayRef,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = op.call(x, w_frozen, b_frozen, w_train, b_train, in_split, out_channels, stride, padding, dilation,
                     frozen_rows, frozen_cols);
    ctx->save_for_backward({x, w_train});
    ctx->saved_data["in_split"] = in_split;
    ctx->saved_data["out_frozen"] = w_frozen.size(0);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    save_edges(ctx, b_frozen, b_train);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = schema("pystage::masked_conv2d_backward")
                         .typed<Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, std::array<bool, 3>, int64_t)>();
    const auto mask = output_mask(ctx);
    if (!mask[0] && !mask[1] && !mask[2]) return variable_list(12);
    const auto saved = ctx->get_saved_variables();
    const int64_t in_split = ctx->saved_data["in_split"].toInt(), out_frozen = ctx->saved_data["out_frozen"].toInt();
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector(),
               dilation = ctx->saved_data["dilation"].toIntVector();
    const auto g = grads[0].contiguous();
    const int64_t path =
        backward_path("masked_conv2d", g, saved[0], saved[1], in_split, out_frozen, stride, padding, dilation, mask);
    return by_argument(mask, op.call(g, saved[0], saved[1], in_split, out_frozen, stride, padding, dilation, mask, path),
                       7);
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& wf, const OptTensor& bf, const at::Tensor& wt,
                           const OptTensor& bt, int64_t in_split, int64_t out, at::IntArrayRef rows,
                           at::IntArrayRef cols) {
  return MaskedLinearFn::apply(x, wf, bf, wt, bt, in_split, out, rows, cols);
}

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& wf, const OptTensor& bf, const at::Tensor& wt,
                           const OptTensor& bt, int64_t in_split, int64_t out, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef rows,
                           at::IntArrayRef cols) {
  return MaskedConv2dFn::apply(x, wf, bf, wt, bt, in_split, out, stride, padding, dilation, rows, cols);
}

}  // namespace
}  // namespace pystage

TORCH_LIBRARY_IMPL(pystage, Autograd, m) {
  m.impl("masked_linear", &pystage::linear_autograd);
  m.impl("masked_conv2d", &pystage::conv2d_autograd);
}
