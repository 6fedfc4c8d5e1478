// Which backward path (masked_backward.h) the autograd kernels run, per op, device, dtype, shapes and
// output mask: picked once, then cached in-process (like cuDNN's benchmark mode).
//
// A miss asks the tuner, the op pystage::autotune_pick, whose kernel pystage/autotune.py registers from
// Python: it measures the candidate paths (or, with measuring off, applies its heuristic) and says whether
// its answer may be cached. The C++ library on its own (no Python tuner registered), tensors the tuner
// cannot time (fake, functional or meta tensors, a dispatch mode such as FakeTensorMode or FlopCounterMode
// active) get the masked path, uncached. The tuner runs outside the cache's lock: it calls the backward ops.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace pystage {

int64_t backward_path(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_train,
                      int64_t in_split, int64_t out_frozen, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, std::array<bool, 3> mask);

// Forget every cached path (pystage.autotune.clear_cache(), set_autotune()); returns how many there were.
int64_t clear_backward_paths();

}  // namespace pystage
