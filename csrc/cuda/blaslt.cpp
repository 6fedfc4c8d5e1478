// The weight and bias gradients of a linear layer in one cuBLASLt call (see blaslt.h).
//
// Row-major gw (T, K) = gy^T @ x is column-major D (K x T) = A @ op(B) with A = x read as a column-major
// (K x B) matrix (lda = x's row stride, op N) and B = gy read as a column-major (T x B) matrix (ldb = gy's row
// stride, op T): M = K, N = T, k = B. CUBLASLT_EPILOGUE_BGRADB reduces op(B) over k into a vector of length
// N: the bias gradient, written during the GEMM instead of by a separate pass over gy. The algorithm chosen
// by cuBLASLt's heuristic is cached per problem (shape, leading dimensions, pointer alignment, dtype, device).
#include "blaslt.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <map>
#include <mutex>
#include <tuple>

namespace pystage {
namespace {

// Largest power of two (<= 256) dividing the address: what the algorithm may assume about a pointer.
uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

struct Problem {
  int device, dtype, compute;
  int64_t m, n, k, lda, ldb;
  uint32_t align_a, align_b, align_d, align_bias;
  auto tie() const { return std::tie(device, dtype, compute, m, n, k, lda, ldb, align_a, align_b, align_d, align_bias); }
  bool operator<(const Problem& o) const { return tie() < o.tie(); }
};

struct AlgoCache {
  std::mutex mu;
  std::map<Problem, std::pair<bool, cublasLtMatmulAlgo_t>> algos;  // false: no algorithm, do not ask again
};

AlgoCache& algo_cache() {
  static AlgoCache c;
  return c;
}

// Descriptors of one call; destroyed with it (cuBLASLt descriptors are cheap host objects).
struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

bool ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }

bool describe(Descs& ds, const Problem& p, void* bias) {
  const auto dt = static_cast<cudaDataType_t>(p.dtype);
  const auto compute = static_cast<cublasComputeType_t>(p.compute);
  const cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_T;
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BGRADB;
  if (!ok(cublasLtMatmulDescCreate(&ds.op, compute, CUDA_R_32F)) ||
      !ok(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a))) ||
      !ok(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b))) ||
      !ok(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue))) ||
      !ok(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias))))
    return false;
  if (!ok(cublasLtMatrixLayoutCreate(&ds.a, dt, p.m, p.k, p.lda)) ||  // x as column-major (K x B)
      !ok(cublasLtMatrixLayoutCreate(&ds.b, dt, p.n, p.k, p.ldb)) ||  // gy as column-major (T x B), op T
      !ok(cublasLtMatrixLayoutCreate(&ds.d, dt, p.m, p.n, p.m)))      // gw^T, column-major (K x T)
    return false;
  const uint64_t ws = at::cuda::getCUDABlasLtWorkspaceSize();
  return ok(cublasLtMatmulPreferenceCreate(&ds.pref)) &&
         ok(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws))) &&
         ok(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &p.align_a,
                                                 sizeof(p.align_a))) &&
         ok(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &p.align_b,
                                                 sizeof(p.align_b))) &&
         ok(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &p.align_d,
                                                 sizeof(p.align_d))) &&
         ok(cublasLtMatmulPreferenceSetAttribute(ds.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &p.align_d,
                                                 sizeof(p.align_d)));
}

// The cached algorithm for p, asking cuBLASLt's heuristic the first time; false where there is none.
bool find_algo(cublasLtHandle_t handle, Descs& ds, const Problem& p, cublasLtMatmulAlgo_t* algo) {
  {
    std::lock_guard<std::mutex> lock(algo_cache().mu);
    auto it = algo_cache().algos.find(p);
    if (it != algo_cache().algos.end()) {
      *algo = it->second.second;
      return it->second.first;
    }
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const bool have = ok(cublasLtMatmulAlgoGetHeuristic(handle, ds.op, ds.a, ds.b, ds.d, ds.d, ds.pref, 1, &result,
                                                      &found)) &&
                    found > 0;
  std::lock_guard<std::mutex> lock(algo_cache().mu);
  algo_cache().algos[p] = {have, result.algo};
  *algo = result.algo;
  return have;
}

}  // namespace

bool linear_wgrad_bias_lt(const at::Tensor& gy, const at::Tensor& x, at::Tensor* gw, at::Tensor* gb) {
  if (!gy.is_cuda() || !x.is_cuda() || gy.dim() != 2 || x.dim() != 2 || gy.stride(1) != 1 || x.stride(1) != 1)
    return false;
  int dtype, compute = CUBLAS_COMPUTE_32F;
  switch (gy.scalar_type()) {
    case at::kFloat:
      dtype = CUDA_R_32F;
      if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;  // as ATen's mm does
      break;
    case at::kHalf: dtype = CUDA_R_16F; break;
    case at::kBFloat16: dtype = CUDA_R_16BF; break;
    default: return false;  // float64: ATen's mm and the reduction kernel
  }
  const int64_t B = gy.size(0), T = gy.size(1), K = x.size(1);
  if (B == 0 || T == 0 || K == 0 || x.size(0) != B) return false;
  const c10::cuda::CUDAGuard guard(gy.device());
  auto w = at::empty({T, K}, gy.options());
  auto b = at::empty({T}, gy.options());
  Problem p{gy.device().index(), dtype, compute, K, T, B, x.stride(0), gy.stride(0), alignment(x.const_data_ptr()),
            alignment(gy.const_data_ptr()), alignment(w.const_data_ptr()), alignment(b.const_data_ptr())};
  Descs ds;
  if (!describe(ds, p, b.mutable_data_ptr())) return false;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulAlgo_t algo;
  if (!find_algo(handle, ds, p, &algo)) return false;
  const float one = 1.f, zero = 0.f;
  const auto stream = at::cuda::getCurrentCUDAStream(gy.device().index()).stream();
  if (!ok(cublasLtMatmul(handle, ds.op, &one, x.const_data_ptr(), ds.a, gy.const_data_ptr(), ds.b, &zero,
                         w.mutable_data_ptr(), ds.d, w.mutable_data_ptr(), ds.d, &algo,
                         at::cuda::getCUDABlasLtWorkspace(), at::cuda::getCUDABlasLtWorkspaceSize(), stream)))
    return false;
  *gw = w;
  *gb = b;
  return true;
}

}  // namespace pystage
