// Argument checks shared by every pystage op.
//
// Each check names the argument, the value it got and what was expected, so a
// user reading the error knows what to fix without reading this code.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

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

// Index tensors of the general (gather/scatter) path. Layout checks run every call (free: metadata only);
// the value checks (range, no repeats) read the indices on the host, which for a CUDA index is a blocking
// device-to-host copy. They run once per index tensor and version (validated_indices() remembers it), so a
// mask that stays the same costs no sync per step; changing it in place (a new version) re-validates.
inline void check_index_values(const at::Tensor& idx, const char* name, int64_t limit) {
  auto host = idx.to(at::kCPU);  // one copy instead of min/max/sort syncs
  const int64_t* p = host.const_data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(std::max<int64_t>(limit, 0)), false);
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < host.numel(); ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK(lo >= 0 && hi < limit, "pystage: ", name, " holds unit indices in [", lo, ", ", hi,
              "] but they must lie in [0, ", limit - 1, "]");
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK(!seen[p[i]], "pystage: ", name, " holds repeated unit indices (", p[i],
                " appears twice); each unit may appear once");
    seen[p[i]] = true;
  }
}

// Index tensors whose values were checked: the tensor (weakly held, so a freed tensor never matches a new
// one at the same address), its version, data pointer and the limit it was checked against.
class ValidatedIndices {
 public:
  bool contains(const at::Tensor& idx, int64_t limit) {
    if (!cacheable(idx)) return false;
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : entries_) {
      if (e.limit == limit && e.version == idx._version() && e.data == idx.const_data_ptr() &&
          e.impl.lock().get() == idx.unsafeGetTensorImpl())
        return true;
    }
    return false;
  }
  void add(const at::Tensor& idx, int64_t limit) {
    if (!cacheable(idx)) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (entries_.size() >= kMax) entries_.erase(entries_.begin());
    entries_.push_back({c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                            idx.getIntrusivePtr()),
                        idx._version(), idx.const_data_ptr(), limit});
  }

 private:
  static bool cacheable(const at::Tensor& idx) {  // inference tensors have no version counter
    return !idx.is_inference() && (idx.is_cpu() || idx.is_cuda());
  }
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
    int64_t version;
    const void* data;
    int64_t limit;
  };
  static constexpr size_t kMax = 64;
  std::mutex mu_;
  std::vector<Entry> entries_;
};

inline ValidatedIndices& validated_indices() {
  static ValidatedIndices cache;
  return cache;
}

inline void check_index(const at::Tensor& idx, const char* name, int64_t limit, const at::Tensor& ref, bool allow_empty) {
  check_rank(idx, name, 1, "(n,) of unit indices");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "pystage: ", name, " must be int64 (torch.long), got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == ref.device(), "pystage: ", name, " is on ", idx.device(), " but x is on ", ref.device());
  check_contiguous(idx, name);
  TORCH_CHECK(allow_empty || idx.numel() > 0, "pystage: ", name,
              " is empty: the trainable set must hold at least one unit (use a fully frozen forward instead)");
  if (idx.numel() == 0 || validated_indices().contains(idx, limit)) return;
  check_index_values(idx, name, limit);
  validated_indices().add(idx, limit);
}

}  // namespace pystage
