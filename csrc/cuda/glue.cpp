// The torch side of the CUDA kernels: the pystage::DeviceKernels table for
// CUDA and the CUDA registrations of every op (TORCH_LIBRARY_IMPL, run when
// the library loads). No Python here, so CMake can link it into a plain
// library; python_module.cpp beside it adds the module pystage._C_cuda.
//
// kernels.cu knows nothing of torch: this file checks devices, dtypes and
// layouts, allocates outputs and workspaces with ATen (caching allocator),
// passes raw pointers and the current stream, and turns a cudaError_t into a
// TORCH_CHECK naming the op. Compiled by the host compiler, not nvcc.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "blaslt.h"    // this directory: gy^T @ x with the bias gradient in the GEMM's epilogue (cuBLASLt)

#include "kernels.h"   // this directory: the C interface of kernels.cu
#include "register.h"  // csrc/: Bound<> and, through it, csrc/kernels.h (DeviceKernels)

namespace pystage {

const DeviceKernels& cuda_kernels();

namespace {

int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return PYSTAGE_CUDA_FLOAT32;
    case at::kDouble: return PYSTAGE_CUDA_FLOAT64;
    case at::kHalf: return PYSTAGE_CUDA_FLOAT16;
    case at::kBFloat16: return PYSTAGE_CUDA_BFLOAT16;
    default: break;
  }
  TORCH_CHECK(false, "pystage: ", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
  return -1;
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pystage: CUDA kernel ", op, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "pystage: ", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// t and ref on the same CUDA device, same dtype.
void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_on_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), "pystage: ", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors of one op must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pystage: ", op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

// A 1-D int64 index tensor on the device of `ref`.
void check_index_on(const at::Tensor& idx, const char* op, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(idx.dim() == 1, "pystage: ", op, ": index must be a 1-D tensor, got shape ", shape_str(idx));
  TORCH_CHECK(idx.scalar_type() == at::kLong, "pystage: ", op, ": index must be int64 (torch.long), got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == ref.device(), "pystage: ", op, ": index is on ", idx.device(), " but ", ref_name,
              " is on ", ref.device(), "; move it with .to(", ref_name, ".device)");
}

// t viewed as (outer, n, inner): sizes of dim 0, dim 1 and the product of the rest.
struct Dims3 {
  int64_t outer, n, inner;
};

Dims3 dims3(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 2, "pystage: ", op, ": ", name, " must have at least 2 dims (outer, n, ...), got shape ",
              shape_str(t));
  int64_t inner = 1;
  for (int64_t d = 2; d < t.dim(); ++d) inner *= t.size(d);
  return {t.size(0), t.size(1), inner};
}

cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// [c0, c0 + n) must be channels of t (its dim 1, d.n of them).
void check_channels(const at::Tensor& t, const Dims3& d, int64_t c0, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(c0 >= 0 && n >= 0 && c0 + n <= d.n, "pystage: ", op, ": channel range [", c0, ", ", c0 + n,
              ") must lie in [0, ", d.n, "] (", name, "'s dim 1, shape ", shape_str(t), ")");
}

at::Tensor gather_dim1(const at::Tensor& src_in, const at::Tensor& idx_in) {
  constexpr const char* op = "gather_dim1";
  check_on_cuda(src_in, op, "src");
  check_index_on(idx_in, op, src_in, "src");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  const auto idx = idx_in.contiguous();
  const auto d = dims3(src, op, "src");
  auto shape = src.sizes().vec();
  shape[1] = idx.numel();
  auto dst = at::empty(shape, src.options());
  check_cuda(pystage_cuda_gather_dim1(src.const_data_ptr(), dst.mutable_data_ptr(), idx.const_data_ptr<int64_t>(),
                                      d.outer, d.n, idx.numel(), d.inner, dtype_code(src, op, "src"), stream_of(src)),
             op);
  return dst;
}

void scatter_dim1(const at::Tensor& dst, const at::Tensor& idx_in, const at::Tensor& src_in) {
  constexpr const char* op = "scatter_dim1";
  check_on_cuda(dst, op, "dst");
  check_like(src_in, op, "src", dst, "dst");
  check_index_on(idx_in, op, dst, "dst");
  const auto d = dims3(dst, op, "dst");
  TORCH_CHECK(src_in.dim() == dst.dim() && src_in.size(1) == idx_in.numel(), "pystage: ", op, ": src must have dst's shape ",
              shape_str(dst), " with dim 1 = index length ", idx_in.numel(), ", got ", shape_str(src_in));
  for (int64_t k = 0; k < dst.dim(); ++k) {
    TORCH_CHECK(k == 1 || src_in.size(k) == dst.size(k), "pystage: ", op, ": src.size(", k, ") must be ", dst.size(k),
                " (dst's), got ", src_in.size(k), " (src ", shape_str(src_in), ", dst ", shape_str(dst), ")");
  }
  const c10::cuda::CUDAGuard guard(dst.device());
  if (!dst.is_contiguous()) {  // a strided view: the generic ATen copy is correct and rare here
    dst.index_copy_(1, idx_in, src_in);
    return;
  }
  const auto src = src_in.contiguous();
  const auto idx = idx_in.contiguous();
  check_cuda(pystage_cuda_scatter_dim1(dst.mutable_data_ptr(), src.const_data_ptr(), idx.const_data_ptr<int64_t>(),
                                       d.outer, d.n, idx.numel(), d.inner, dtype_code(dst, op, "dst"), stream_of(dst)),
             op);
}

at::Tensor bias_grad(const at::Tensor& grad_in, int64_t c0, int64_t n) {
  constexpr const char* op = "bias_grad";
  check_on_cuda(grad_in, op, "grad");
  const auto d = dims3(grad_in, op, "grad");
  check_channels(grad_in, d, c0, n, op, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = grad_in.contiguous();
  const int dtype = dtype_code(grad, op, "grad");
  auto out = at::empty({n}, grad.options());
  const size_t ws_bytes = pystage_cuda_bias_grad_workspace_size(d.outer, d.n, d.inner, n, dtype);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, grad.options().dtype(at::kByte));
  check_cuda(pystage_cuda_bias_grad(grad.const_data_ptr(), out.mutable_data_ptr(), d.outer, d.n, d.inner, c0, n,
                                    ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, ws_bytes, dtype, stream_of(grad)),
             op);
  return out;
}

std::vector<int64_t> with_dim1(const at::Tensor& t, int64_t n) {
  auto shape = t.sizes().vec();
  shape[1] = n;
  return shape;
}

at::Tensor narrow_copy_dim1(const at::Tensor& src_in, int64_t c0, int64_t n, at::Tensor* bias) {
  constexpr const char* op = "narrow_copy_dim1";
  check_on_cuda(src_in, op, "src");
  const auto d = dims3(src_in, op, "src");
  check_channels(src_in, d, c0, n, op, "src");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  auto out = at::empty(with_dim1(src, n), src.options());
  if (bias == nullptr || d.inner < 32) {  // nothing to fuse (or maps too small for whole-warp runs)
    out.copy_(src.narrow(1, c0, n));
    if (bias) *bias = bias_grad(out, 0, n);
    return out;
  }
  const int dtype = dtype_code(src, op, "src");
  *bias = at::empty({n}, src.options());
  const size_t ws_bytes = pystage_cuda_narrow_copy_bias_workspace_size(d.outer, d.inner, n, dtype);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, src.options().dtype(at::kByte));
  check_cuda(pystage_cuda_narrow_copy_bias(src.const_data_ptr(), out.mutable_data_ptr(), bias->mutable_data_ptr(),
                                           d.outer, d.n, d.inner, c0, n, ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr,
                                           ws_bytes, dtype, stream_of(src)),
             op);
  return out;
}

at::Tensor pad_dim1(const at::Tensor& src_in, int64_t channels, int64_t c0) {
  constexpr const char* op = "pad_dim1";
  check_on_cuda(src_in, op, "src");
  const auto d = dims3(src_in, op, "src");
  TORCH_CHECK(c0 >= 0 && c0 + d.n <= channels, "pystage: ", op, ": channels [", c0, ", ", c0 + d.n,
              ") must lie in [0, ", channels, "]");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const auto src = src_in.contiguous();
  auto out = at::empty(with_dim1(src, channels), src.options());
  check_cuda(pystage_cuda_pad_dim1(src.const_data_ptr(), out.mutable_data_ptr(), d.outer, d.n, channels, d.inner, c0,
                                   dtype_code(src, op, "src"), stream_of(src)),
             op);
  return out;
}

void block_triangular_mask(const at::Tensor& weight, c10::IntArrayRef out_ends, c10::IntArrayRef in_ends) {
  constexpr const char* op = "block_triangular_mask_";
  check_on_cuda(weight, op, "weight");
  TORCH_CHECK(weight.is_contiguous(), "pystage: ", op, ": weight must be contiguous, got strides ", weight.strides());
  TORCH_CHECK(out_ends.size() == in_ends.size() && !out_ends.empty(), "pystage: ", op,
              ": out_ends and in_ends must list the same (>= 1) growth steps, got ", out_ends.size(), " and ",
              in_ends.size(), " entries");
  const auto d = dims3(weight, op, "weight");
  const int64_t steps = static_cast<int64_t>(out_ends.size());
  // The kernel reads the step bounds from device memory: one small H2D copy (the mask runs once per growth step).
  std::vector<int64_t> ends(out_ends.begin(), out_ends.end());
  ends.insert(ends.end(), in_ends.begin(), in_ends.end());
  const c10::cuda::CUDAGuard guard(weight.device());
  auto ends_dev = at::tensor(ends, at::TensorOptions().dtype(at::kLong)).to(weight.device());
  const int64_t* p = ends_dev.const_data_ptr<int64_t>();
  check_cuda(pystage_cuda_block_triangular_mask(weight.mutable_data_ptr(), d.outer, d.n, d.inner, p, p + steps, steps,
                                                dtype_code(weight, op, "weight"), stream_of(weight)),
             op);
}

DeviceKernels make_cuda_kernels() {
  DeviceKernels k;
  k.gather_dim1 = &gather_dim1;
  k.scatter_dim1 = &scatter_dim1;
  k.bias_grad = &bias_grad;
  k.block_triangular_mask = &block_triangular_mask;
  k.narrow_copy_dim1 = &narrow_copy_dim1;
  k.pad_dim1 = &pad_dim1;
  k.linear_wgrad_bias = &linear_wgrad_bias_lt;
  return k;
}

}  // namespace

const DeviceKernels& cuda_kernels() {
  static const DeviceKernels k = make_cuda_kernels();
  return k;
}

}  // namespace pystage

TORCH_LIBRARY_IMPL(pystage, CUDA, m) {
  pystage::Bound<pystage::cuda_kernels>::register_all(m);
}
