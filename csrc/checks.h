// Argument checks shared by every pystage op.
//
// Each check names the argument, the value it got and what was expected, so a
// user reading the error knows what to fix without reading this code.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace pystage {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "pystage: ", name, " must be a ", rank, "-D tensor ", layout, ", got a ",
              t.dim(), "-D tensor of shape ", shape_str(t));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "pystage: ", name, " must be contiguous (shape ", shape_str(t), ", strides ",
              t.strides(), "); call .contiguous() on it first");
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, "pystage: ", name,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pystage: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors of one op must share a dtype");
  TORCH_CHECK(t.device() == ref.device(), "pystage: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors of one op must be on one device");
}

inline void check_dim_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "pystage: ", name, ".size(", dim, ") must be ", expected, " (", what,
              "), got ", t.size(dim), " (shape ", shape_str(t), ")");
}

inline void check_range(int64_t value, const char* name, int64_t lo, int64_t hi, const char* what) {
  TORCH_CHECK(value >= lo && value <= hi, "pystage: ", name, " must be in [", lo, ", ", hi, "] (", what,
              "), got ", value);
}

// A weight/bias pair of one unit block: checks bias shape, dtype, device, layout.
inline void check_bias(const c10::optional<at::Tensor>& b, const char* name, int64_t units, const at::Tensor& ref) {
  if (!b.has_value() || !b->defined()) return;
  check_rank(*b, name, 1, "(units,)");
  check_dim_size(*b, name, 0, units, "one bias per unit of the block");
  check_same(*b, name, ref, "x");
  check_contiguous(*b, name);
}

// Index tensors of the general (gather/scatter) path.
inline void check_index(const at::Tensor& idx, const char* name, int64_t limit, const at::Tensor& ref, bool allow_empty) {
  check_rank(idx, name, 1, "(n,) of unit indices");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "pystage: ", name, " must be int64 (torch.long), got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == ref.device(), "pystage: ", name, " is on ", idx.device(), " but x is on ", ref.device());
  check_contiguous(idx, name);
  TORCH_CHECK(allow_empty || idx.numel() > 0, "pystage: ", name,
              " is empty: the trainable set must hold at least one unit (use a fully frozen forward instead)");
  if (idx.numel() == 0) return;
  auto lo = idx.min().item<int64_t>();
  auto hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < limit, "pystage: ", name, " holds unit indices in [", lo, ", ", hi,
              "] but they must lie in [0, ", limit - 1, "]");
  auto sorted = std::get<0>(idx.sort());
  TORCH_CHECK(sorted.numel() < 2 || (sorted.slice(0, 1) != sorted.slice(0, 0, -1)).all().item<bool>(), "pystage: ",
              name, " holds repeated unit indices; each unit may appear once");
}

}  // namespace pystage
