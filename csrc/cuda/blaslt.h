// The weight and bias gradients of a linear layer in one cuBLASLt call (CUBLASLT_EPILOGUE_BGRADB).
#pragma once

#include <ATen/ATen.h>

namespace pystage {

// gy (B, T) and x (B, K): row-major, unit column stride, any row stride (column blocks of wider matrices).
// On success allocates *gw = gy^T @ x (T, K) and *gb = sum of gy over B (T,), and returns true; returns false,
// allocating nothing, where cuBLASLt has no algorithm for these operands (the caller then runs mm + a reduction).
bool linear_wgrad_bias_lt(const at::Tensor& gy, const at::Tensor& x, at::Tensor* gw, at::Tensor* gb);

}  // namespace pystage
