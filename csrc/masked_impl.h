// Masked partial-gradient linear and conv2d, written once for every device: argument checks and forward
// (backward: masked_backward.h).
//
// Layout of a masked layer (see DESIGN.md, "Masked partial-gradient layers"):
//   output units [0, F)        frozen: read inputs [0, in_split), weights w_frozen (F, in_split)
//   output units [F, F + T)    trainable (newest block): read inputs [0, in_active), weights w_train (T, in_active)
//   output units [F + T, out)  inactive: zero, cost nothing
// Inputs [in_split, in_active) are the units that are trainable in the layer
// below; they are the only inputs whose gradient backward computes.
//
// Backward therefore costs (per output element) T * in_active for dW plus
// T * (in_active - in_split) for dX, instead of 2 * out * in for a dense layer.
//
// At full width (no frozen units, every unit trainable and active) the forward is exactly the dense call.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "kernels.h"

namespace pystage {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct BlockShape {
  int64_t frozen;     // F: frozen output units
  int64_t trainable;  // T: trainable output units
  int64_t in_split;   // inputs read by frozen units; first input whose gradient is computed
  int64_t in_active;  // inputs read by trainable units
};

// Backward results; an output whose mask bit is off is its own empty tensor (outputs must not alias).
inline Grads pack_grads(const at::Tensor& x, std::array<bool, 3> mask, const at::Tensor& gx, const at::Tensor& gw,
                        const at::Tensor& gb) {
  auto none = [&] { return at::empty({0}, x.options()); };
  return {mask[0] ? gx : none(), mask[1] ? gw : none(), mask[2] ? gb : none()};
}

// Growth steps of the frozen block: rows [rows[s-1], rows[s]) read inputs [0, cols[s]). Empty lists: one step
// (every frozen row reads [0, in_split)). Running one GEMM per step keeps each frozen unit's arithmetic exactly
// what it was while it trained, so its output stays bit-identical after later growth.
struct FrozenSteps {
  std::vector<int64_t> rows, cols;
};

inline FrozenSteps check_steps(at::IntArrayRef rows, at::IntArrayRef cols, int64_t frozen, int64_t in_split) {
  TORCH_CHECK(rows.size() == cols.size(), "pystage: frozen_rows and frozen_cols must list the same growth steps, got ",
              rows.size(), " and ", cols.size(), " entries");
  if (rows.empty()) return {{frozen}, {in_split}};
  int64_t r = 0, c = 0;
  for (size_t s = 0; s < rows.size(); ++s) {
    TORCH_CHECK(rows[s] > r && rows[s] <= frozen, "pystage: frozen_rows[", s, "] must be in [", r + 1, ", ", frozen,
                "] (cumulative frozen units after each growth step, increasing), got ", rows[s]);
    TORCH_CHECK(cols[s] >= c && cols[s] <= in_split, "pystage: frozen_cols[", s, "] must be in [", c, ", ", in_split,
                "] (inputs read by that step's units, non-decreasing), got ", cols[s]);
    r = rows[s];
    c = cols[s];
  }
  TORCH_CHECK(r == frozen && c == in_split, "pystage: the last growth step must end at w_frozen's shape (", frozen, ", ",
              in_split, "), got frozen_rows[-1]=", r, ", frozen_cols[-1]=", c);
  return {rows.vec(), cols.vec()};
}

// Checks common to linear and conv2d; `x_name`-style labels keep messages specific.
inline BlockShape check_blocks(const at::Tensor& x, const at::Tensor& w_frozen, const c10::optional<at::Tensor>& b_frozen,
                               const at::Tensor& w_train, const c10::optional<at::Tensor>& b_train, int64_t in_split,
                               int64_t out_units) {
  check_float_dtype(x, "x");
  check_same(w_frozen, "w_frozen", x, "x");
  check_same(w_train, "w_train", x, "x");
  check_contiguous(x, "x");
  check_contiguous(w_frozen, "w_frozen");
  check_contiguous(w_train, "w_train");
  BlockShape s{w_frozen.size(0), w_train.size(0), in_split, w_train.size(1)};
  TORCH_CHECK(s.trainable > 0, "pystage: w_train has 0 rows: the trainable set must hold at least one unit "
              "(a fully frozen layer should run its plain forward instead)");
  check_range(s.in_active, "w_train.size(1) (active inputs)", 1, x.size(1), "inputs of x the trainable units read");
  check_range(in_split, "in_split", 0, s.in_active, "first input unit that is trainable in the layer below");
  check_dim_size(w_frozen, "w_frozen", 1, in_split, "frozen units read exactly the inputs older than in_split");
  check_range(s.frozen + s.trainable, "active output units (w_frozen.size(0) + w_train.size(0))", 1, out_units,
              "at most the layer's output width");
  check_bias(b_frozen, "b_frozen", s.frozen, x);
  check_bias(b_train, "b_train", s.trainable, x);
  TORCH_CHECK(b_frozen.has_value() == b_train.has_value(), "pystage: b_frozen and b_train must both be given or both be None, got ",
              b_frozen.has_value() ? "b_frozen only" : "b_train only");
  return s;
}

// out = x @ w.T (+ b), written into a column block of a wider output.
inline void linear_into(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (x.size(1) == 0) {  // no inputs: bias only
    if (b.has_value()) out.copy_(b->unsqueeze(0).expand_as(out)); else out.zero_();
  } else if (b.has_value()) {
    at::addmm_out(out, b->unsqueeze(0).expand_as(out), x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

inline at::Tensor masked_linear_forward(const DeviceKernels&, const at::Tensor& x, const at::Tensor& w_frozen,
                                        const c10::optional<at::Tensor>& b_frozen, const at::Tensor& w_train,
                                        const c10::optional<at::Tensor>& b_train, int64_t in_split, int64_t out_features,
                                        at::IntArrayRef frozen_rows, at::IntArrayRef frozen_cols) {
  check_rank(x, "x", 2, "(batch, in_features)");
  check_rank(w_frozen, "w_frozen", 2, "(frozen_units, in_split)");
  check_rank(w_train, "w_train", 2, "(trainable_units, in_active)");
  auto s = check_blocks(x, w_frozen, b_frozen, w_train, b_train, in_split, out_features);
  auto steps = check_steps(frozen_rows, frozen_cols, s.frozen, in_split);
  auto y = at::empty({x.size(0), out_features}, x.options());  // (B, out)
  for (size_t i = 0; s.frozen > 0 && i < steps.rows.size(); ++i) {
    const int64_t r0 = i ? steps.rows[i - 1] : 0, n = steps.rows[i] - r0, c = steps.cols[i];
    c10::optional<at::Tensor> b = b_frozen ? c10::optional<at::Tensor>(b_frozen->narrow(0, r0, n)) : c10::nullopt;
    linear_into(y.narrow(1, r0, n), x.narrow(1, 0, c), w_frozen.narrow(0, r0, n).narrow(1, 0, c), b);
  }
  linear_into(y.narrow(1, s.frozen, s.trainable), x.narrow(1, 0, s.in_active), w_train, b_train);
  int64_t active = s.frozen + s.trainable;
  if (active < out_features) y.narrow(1, active, out_features - active).zero_();
  return y;
}

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
};

inline void check_conv_args(const ConvArgs& c) {
  for (const auto& [name, v, lo] : {std::tuple<const char*, at::IntArrayRef, int64_t>{"stride", c.stride, 1},
                             {"padding", c.padding, 0}, {"dilation", c.dilation, 1}}) {
    TORCH_CHECK(v.size() == 2, "pystage: ", name, " must have 2 entries (h, w), got ", v.size());
    TORCH_CHECK(v[0] >= lo && v[1] >= lo, "pystage: ", name, " must be >= ", lo, " in both dims, got ", v);
  }
}

inline at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, const ConvArgs& c) {
  return at::convolution(x, w, b, c.stride, c.padding, c.dilation, false, {0, 0}, 1);
}

inline at::Tensor masked_conv2d_forward(const DeviceKernels&, const at::Tensor& x, const at::Tensor& w_frozen,
                                        const c10::optional<at::Tensor>& b_frozen, const at::Tensor& w_train,
                                        const c10::optional<at::Tensor>& b_train, int64_t in_split, int64_t out_channels,
                                        const ConvArgs& c, at::IntArrayRef frozen_rows, at::IntArrayRef frozen_cols) {
  check_rank(x, "x", 4, "(batch, channels, height, width)");
  check_rank(w_frozen, "w_frozen", 4, "(frozen_units, in_split, kh, kw)");
  check_rank(w_train, "w_train", 4, "(trainable_units, in_active, kh, kw)");
  check_conv_args(c);
  auto s = check_blocks(x, w_frozen, b_frozen, w_train, b_train, in_split, out_channels);
  auto steps = check_steps(frozen_rows, frozen_cols, s.frozen, in_split);
  TORCH_CHECK(w_frozen.size(2) == w_train.size(2) && w_frozen.size(3) == w_train.size(3),
              "pystage: w_frozen and w_train must share a kernel size, got ", shape_str(w_frozen), " and ", shape_str(w_train));
  auto yt = conv(x.narrow(1, 0, s.in_active), w_train, b_train, c);  // (B, T, Ho, Wo)
  int64_t active = s.frozen + s.trainable;
  if (s.frozen == 0 && active == out_channels) return yt;  // one block: no copy
  auto y = at::empty({x.size(0), out_channels, yt.size(2), yt.size(3)}, x.options());
  for (size_t i = 0; s.frozen > 0 && i < steps.rows.size(); ++i) {
    const int64_t r0 = i ? steps.rows[i - 1] : 0, n = steps.rows[i] - r0, cols = steps.cols[i];
    auto out = y.narrow(1, r0, n);
    c10::optional<at::Tensor> b = b_frozen ? c10::optional<at::Tensor>(b_frozen->narrow(0, r0, n)) : c10::nullopt;
    if (cols > 0) {
      out.copy_(conv(x.narrow(1, 0, cols), w_frozen.narrow(0, r0, n).narrow(1, 0, cols).contiguous(), b, c));
    } else if (b) {
      out.copy_(b->view({1, -1, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
  }
  y.narrow(1, s.frozen, s.trainable).copy_(yt);
  if (active < out_channels) y.narrow(1, active, out_channels - active).zero_();
  return y;
}

}  // namespace pystage
