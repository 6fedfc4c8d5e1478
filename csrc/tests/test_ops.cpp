// C++ tests of the pystage ops through the dispatcher (no Python): values
// against the dense reference, backward block structure, and argument checks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <functional>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void expect_throws(const std::function<void()>& fn, const std::string& needle, const std::string& what) {
  try {
    fn();
    expect(false, what + " (no error raised)");
  } catch (const c10::Error& e) {
    std::string msg = e.what();
    expect(msg.find(needle) != std::string::npos, what + " (message names '" + needle + "')");
  }
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& wf, const c10::optional<at::Tensor>& bf,
                         const at::Tensor& wt, const c10::optional<at::Tensor>& bt, int64_t split, int64_t out) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pystage::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t,
                                         at::IntArrayRef, at::IntArrayRef)>();
  return op.call(x, wf, bf, wt, bt, split, out, {}, {});  // one frozen growth step
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(const at::Tensor& g, const at::Tensor& x,
                                                                      const at::Tensor& wt, int64_t split,
                                                                      int64_t out_frozen, int64_t path = 0) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pystage::masked_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, std::array<bool, 3>,
                           int64_t)>();
  return op.call(g, x, wt, split, out_frozen, {true, true, true}, path);
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& wt, int64_t split, int64_t out) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pystage::masked_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, int64_t,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op.call(x, wf, c10::nullopt, wt, c10::nullopt, split, out, {1, 1}, {1, 1}, {1, 1}, {}, {});
}

void test_linear() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({5, 12}, opts);
  auto wf = at::randn({3, 8}, opts), bf = at::randn({3}, opts);
  auto wt = at::randn({4, 10}, opts), bt = at::randn({4}, opts);
  auto y = masked_linear(x, wf, bf, wt, bt, 8, 9);
  auto w = at::zeros({9, 12}, opts);
  w.slice(0, 0, 3).slice(1, 0, 8).copy_(wf);
  w.slice(0, 3, 7).slice(1, 0, 10).copy_(wt);
  auto b = at::zeros({9}, opts);
  b.slice(0, 0, 3).copy_(bf);
  b.slice(0, 3, 7).copy_(bt);
  expect(at::allclose(y, at::linear(x, w, b)), "masked_linear forward equals the dense reference");

  auto g = at::randn({5, 9}, opts);
  auto [gx, gw, gb] = masked_linear_backward(g, x, wt, 8, 3);
  auto gy = g.slice(1, 3, 7);
  expect(at::allclose(gw, gy.t().mm(x.slice(1, 0, 10))), "grad of trainable weight");
  expect(at::allclose(gb, gy.sum(0)), "grad of trainable bias");
  expect(at::allclose(gx.slice(1, 8, 10), gy.mm(wt.slice(1, 8, 10))), "grad of trainable inputs");
  expect(gx.slice(1, 0, 8).abs().max().item<double>() == 0.0, "no grad computed for frozen inputs");

  for (int64_t path : {1, 2}) {  // dense-then-discard; masked with the bias fused (the masked path on CPU)
    auto [px, pw, pb] = masked_linear_backward(g, x, wt, 8, 3, path);
    const auto name = " (path " + std::to_string(path) + ")";
    expect(at::allclose(pw, gw) && at::allclose(pb, gb) && at::allclose(px, gx), "backward path agrees" + name);
    expect(px.slice(1, 0, 8).abs().max().item<double>() == 0.0, "no grad for frozen inputs" + name);
  }
  expect_throws([&] { masked_linear_backward(g, x, wt, 8, 3, 3); }, "path must be", "unknown backward path rejected");
  auto [ex, ew, eb] = masked_linear_backward(g.slice(0, 0, 0), x.slice(0, 0, 0), wt, 8, 3);
  expect(ex.size(0) == 0 && ew.abs().max().item<double>() == 0.0 && eb.abs().max().item<double>() == 0.0,
         "empty batch: zero weight and bias grads");
  expect_throws([&] { masked_linear(x.t(), wf, bf, wt, bt, 8, 9); }, "x", "non-contiguous x rejected");
  expect_throws([&] { masked_linear(x, wf, bf, wt, bt, 9, 9); }, "w_frozen", "in_split that disagrees with w_frozen");
  expect_throws([&] { masked_linear(x, wf, bf, wt.slice(0, 0, 0), bt.slice(0, 0, 0), 8, 9); }, "trainable",
                "empty trainable set rejected");
  expect_throws([&] { masked_linear(x.to(at::kFloat), wf, bf, wt, bt, 8, 9); }, "dtype", "dtype mix rejected");
  expect_throws([&] { masked_linear(x, wf, bf, wt, bt, 8, 5); }, "active output units", "output too narrow");
}

void test_conv() {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({2, 6, 7, 7}, opts);
  auto wf = at::randn({3, 4, 3, 3}, opts), wt = at::randn({2, 6, 3, 3}, opts);
  auto y = masked_conv2d(x, wf, wt, 4, 6);
  auto w = at::zeros({6, 6, 3, 3}, opts);
  w.slice(0, 0, 3).slice(1, 0, 4).copy_(wf);
  w.slice(0, 3, 5).copy_(wt);
  auto ref = at::conv2d(x, w, {}, {1, 1}, {1, 1});
  expect(at::allclose(y, ref), "masked_conv2d forward equals the dense reference");
  expect(y.slice(1, 5, 6).abs().max().item<double>() == 0.0, "inactive channel outputs zero");
  expect_throws([&] { masked_conv2d(x.slice(0, 0, 1).squeeze(0), wf, wt, 4, 6); }, "x must be a 4-D",
                "wrong rank rejected");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_linear();
  test_conv();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
