// The backward path cache (see backward_paths.h).
#include "backward_paths.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace pystage {
namespace {

using Key = std::vector<int64_t>;

struct Cache {
  std::mutex mu;
  std::map<Key, int64_t> paths;
};

Cache& cache() {
  static Cache c;
  return c;
}

// A real CPU/CUDA tensor the tuner can run the ops on and time (not a wrapper or a fake).
bool plain(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  return (t.is_cpu() || t.is_cuda()) && (t.key_set() & wrapped).empty();
}

void append(Key& k, at::IntArrayRef v) {
  k.push_back(static_cast<int64_t>(v.size()));
  k.insert(k.end(), v.begin(), v.end());
}

Key make_key(const char* op, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, int64_t in_split,
             int64_t out_frozen, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
             std::array<bool, 3> mask) {
  Key k{static_cast<int64_t>(std::hash<std::string>{}(op)), static_cast<int64_t>(x.device().type()),
        x.device().index(), static_cast<int64_t>(x.scalar_type()), in_split, out_frozen,
        mask[0] + 2 * mask[1] + 4 * mask[2]};
  for (auto v : {g.sizes(), x.sizes(), w.sizes(), stride, padding, dilation}) append(k, v);
  return k;
}

std::optional<c10::OperatorHandle> tuner() {
  auto op = c10::Dispatcher::singleton().findSchema({"pystage::autotune_pick", ""});
  if (op && op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) return op;
  return std::nullopt;
}

}  // namespace

int64_t backward_path(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_train,
                      int64_t in_split, int64_t out_frozen, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, std::array<bool, 3> mask) {
  constexpr int64_t kMasked = 0;
  if (!plain(grad_out) || !plain(x) || !plain(w_train) || c10::impl::TorchDispatchModeTLS::any_modes_set())
    return kMasked;
  const Key key = make_key(op, grad_out, x, w_train, in_split, out_frozen, stride, padding, dilation, mask);
  {
    std::lock_guard<std::mutex> lock(cache().mu);
    auto it = cache().paths.find(key);
    if (it != cache().paths.end()) return it->second;
  }
  const auto t = tuner();
  if (!t) return kMasked;
  auto pick = t->typed<std::tuple<int64_t, bool>(c10::string_view, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, int64_t, int64_t, at::IntArrayRef, at::IntArrayRef,
                                                 at::IntArrayRef, std::array<bool, 3>)>();
  // Unlocked while the tuner runs: it runs the backward ops, which may re-enter here for other layers.
  auto [path, cacheable] = pick.call(op, grad_out, x, w_train, in_split, out_frozen, stride, padding, dilation, mask);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache().mu);
    cache().paths.emplace(key, path);
  }
  return path;
}

int64_t clear_backward_paths() {
  std::lock_guard<std::mutex> lock(cache().mu);
  const auto n = static_cast<int64_t>(cache().paths.size());
  cache().paths.clear();
  return n;
}

}  // namespace pystage
