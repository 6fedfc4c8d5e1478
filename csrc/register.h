// Binds the device-independent op bodies to one device's kernel table, so
// that CPU (ops.cpp) and CUDA (cuda/glue.cpp) register the same functions.
#pragma once

#include <torch/library.h>

#include "masked_backward.h"
#include "masked_indexed.h"

namespace pystage {

inline void check_block_ends(c10::IntArrayRef ends, const char* name, int64_t size) {
  int64_t prev = 0;
  for (size_t s = 0; s < ends.size(); ++s) {
    TORCH_CHECK(ends[s] >= prev && ends[s] <= size, "pystage: ", name, "[", s, "] must be in [", prev, ", ", size,
                "] (cumulative unit count after each growth step, non-decreasing), got ", ends[s]);
    prev = ends[s];
  }
  TORCH_CHECK(!ends.empty() && prev == size, "pystage: ", name, " must end at the layer's unit count ", size, ", got ", ends);
}

template <const DeviceKernels& (*K)()>
struct Bound {
  static at::Tensor linear(const at::Tensor& x, const at::Tensor& wf, const c10::optional<at::Tensor>& bf,
                           const at::Tensor& wt, const c10::optional<at::Tensor>& bt, int64_t in_split, int64_t out,
                           at::IntArrayRef frozen_rows, at::IntArrayRef frozen_cols) {
    return masked_linear_forward(K(), x, wf, bf, wt, bt, in_split, out, frozen_rows, frozen_cols);
  }
  static Grads linear_bw(const at::Tensor& g, const at::Tensor& x, const at::Tensor& wt, int64_t in_split,
                         int64_t out_frozen, std::array<bool, 3> mask, int64_t path) {
    return masked_linear_backward(K(), g, x, wt, in_split, out_frozen, mask, path);
  }
  static at::Tensor conv2d(const at::Tensor& x, const at::Tensor& wf, const c10::optional<at::Tensor>& bf,
                           const at::Tensor& wt, const c10::optional<at::Tensor>& bt, int64_t in_split, int64_t out,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           at::IntArrayRef frozen_rows, at::IntArrayRef frozen_cols) {
    return masked_conv2d_forward(K(), x, wf, bf, wt, bt, in_split, out, {stride, padding, dilation}, frozen_rows,
                                 frozen_cols);
  }
  static Grads conv2d_bw(const at::Tensor& g, const at::Tensor& x, const at::Tensor& wt, int64_t in_split,
                         int64_t out_frozen, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         std::array<bool, 3> mask, int64_t path) {
    return masked_conv2d_backward(K(), g, x, wt, in_split, out_frozen, {stride, padding, dilation}, mask, path);
  }
  static at::Tensor linear_ix(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                              const at::Tensor& wt, const c10::optional<at::Tensor>& bt, const at::Tensor& out_index,
                              const at::Tensor& in_index) {
    check_rank(x, "x", 2, "(batch, in_features)");
    check_rank(w, "weight", 2, "(out_features, in_features)");
    check_index(in_index, "in_index", x.size(1), x, /*allow_empty=*/true);
    return masked_indexed_forward(K(), x, w, b, wt, bt, out_index, nullptr);
  }
  static Grads linear_ix_bw(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& wt,
                            const at::Tensor& out_index, const at::Tensor& in_index, std::array<bool, 3> mask) {
    check_rank(g, "grad_out", 2, "(batch, out_features)");
    check_rank(x, "x", 2, "(batch, in_features)");
    check_rank(w, "weight", 2, "(out_features, in_features)");
    return masked_indexed_backward(K(), g, x, w, wt, out_index, in_index, nullptr, mask);
  }
  static at::Tensor conv2d_ix(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                              const at::Tensor& wt, const c10::optional<at::Tensor>& bt, const at::Tensor& out_index,
                              const at::Tensor& in_index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    check_rank(x, "x", 4, "(batch, channels, height, width)");
    check_rank(w, "weight", 4, "(out_channels, in_channels, kh, kw)");
    check_index(in_index, "in_index", x.size(1), x, /*allow_empty=*/true);
    ConvArgs c{stride, padding, dilation};
    check_conv_args(c);
    return masked_indexed_forward(K(), x, w, b, wt, bt, out_index, &c);
  }
  static Grads conv2d_ix_bw(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& wt,
                            const at::Tensor& out_index, const at::Tensor& in_index, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
    check_rank(g, "grad_out", 4, "(batch, out_channels, height, width)");
    check_rank(x, "x", 4, "(batch, channels, height, width)");
    check_rank(w, "weight", 4, "(out_channels, in_channels, kh, kw)");
    ConvArgs c{stride, padding, dilation};
    check_conv_args(c);
    return masked_indexed_backward(K(), g, x, w, wt, out_index, in_index, &c, mask);
  }
  static void mask(const at::Tensor& weight, at::IntArrayRef out_ends, at::IntArrayRef in_ends) {
    TORCH_CHECK(weight.dim() >= 2, "pystage: weight must have at least 2 dims (out, in, ...), got shape ", shape_str(weight));
    check_float_dtype(weight, "weight");
    check_contiguous(weight, "weight");
    check_block_ends(out_ends, "out_ends", weight.size(0));
    check_block_ends(in_ends, "in_ends", weight.size(1));
    TORCH_CHECK(out_ends.size() == in_ends.size(), "pystage: out_ends and in_ends must list the same growth steps, got ",
                out_ends.size(), " and ", in_ends.size(), " entries");
    K().block_triangular_mask(weight, out_ends, in_ends);
  }

  static void register_all(torch::Library& m) {
    m.impl("masked_linear", &linear);
    m.impl("masked_linear_backward", &linear_bw);
    m.impl("masked_conv2d", &conv2d);
    m.impl("masked_conv2d_backward", &conv2d_bw);
    m.impl("masked_linear_indexed", &linear_ix);
    m.impl("masked_linear_indexed_backward", &linear_ix_bw);
    m.impl("masked_conv2d_indexed", &conv2d_ix);
    m.impl("masked_conv2d_indexed_backward", &conv2d_ix_bw);
    m.impl("block_triangular_mask_", &mask);
  }
};

}  // namespace pystage
