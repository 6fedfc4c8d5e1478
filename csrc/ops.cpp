// Schemas of every pystage op, written once, and their CPU kernels. Autograd of the fast-path ops:
// autograd.cpp; their backward path cache: backward_paths.cpp.
#include <torch/library.h>

#include "backward_paths.h"
#include "register.h"

TORCH_LIBRARY(pystage, m) {
  m.def("masked_linear(Tensor x, Tensor w_frozen, Tensor? b_frozen, Tensor w_train, Tensor? b_train, "
        "int in_split, int out_features, int[] frozen_rows=[], int[] frozen_cols=[]) -> Tensor");
  // path: 0 masked (least work), 1 dense-then-discard, 2 masked with the bias gradient fused into the weight GEMM
  // (masked_backward.h); the autograd kernels pick it per shape (backward_paths.h).
  m.def("masked_linear_backward(Tensor grad_out, Tensor x, Tensor w_train, int in_split, int out_frozen, "
        "bool[3] output_mask, int path=0) -> (Tensor, Tensor, Tensor)");
  m.def("masked_conv2d(Tensor x, Tensor w_frozen, Tensor? b_frozen, Tensor w_train, Tensor? b_train, "
        "int in_split, int out_channels, int[2] stride, int[2] padding, int[2] dilation, int[] frozen_rows=[], "
        "int[] frozen_cols=[]) -> Tensor");
  m.def("masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor w_train, int in_split, int out_frozen, "
        "int[2] stride, int[2] padding, int[2] dilation, bool[3] output_mask, int path=0) -> (Tensor, Tensor, Tensor)");
  m.def("masked_linear_indexed(Tensor x, Tensor weight, Tensor? bias, Tensor w_train, Tensor? b_train, "
        "Tensor out_index, Tensor in_index) -> Tensor");
  m.def("masked_linear_indexed_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor w_train, Tensor out_index, "
        "Tensor in_index, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("masked_conv2d_indexed(Tensor x, Tensor weight, Tensor? bias, Tensor w_train, Tensor? b_train, "
        "Tensor out_index, Tensor in_index, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("masked_conv2d_indexed_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor w_train, Tensor out_index, "
        "Tensor in_index, int[2] stride, int[2] padding, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("block_triangular_mask_(Tensor(a!) weight, int[] out_ends, int[] in_ends) -> ()");
  // The backward path tuner: implemented in Python (pystage/autotune.py registers it); returns (path, cacheable).
  m.def("autotune_pick(str op, Tensor grad_out, Tensor x, Tensor w_train, int in_split, int out_frozen, "
        "int[] stride, int[] padding, int[] dilation, bool[3] output_mask) -> (int, bool)");
  // Forgets the cached backward paths; returns how many were cached.
  m.def("autotune_clear() -> int", [] { return pystage::clear_backward_paths(); });
}

TORCH_LIBRARY_IMPL(pystage, CPU, m) {
  pystage::Bound<pystage::cpu_kernels>::register_all(m);
}
