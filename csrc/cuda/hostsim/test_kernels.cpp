// The kernels of csrc/cuda/kernels.cu run on the CPU through sim.h, against plain loops (driver: ./run).
// Exercises every dtype, pointers at odd element offsets (each copy/zero unit width), both layouts of the
// bias reduction with one and several splits, empty sums, the mask with empty and single steps, and
// checks that nothing is written past the end of an output.
#include "kernels_sim.cpp"  // kernels.cu with each <<<>>> launch rewritten by ./run

#include <algorithm>
#include <cstdio>
#include <random>
#include <cmath>
extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return cudaSuccess; }

static std::mt19937 rng(1);
static int fails = 0;
#define EXPECT(c, ...) do { if (!(c)) { ++fails; printf("FAIL %s:%d ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

template <typename T> T from_d(double v);
template <> float from_d(double v) { return (float)v; }
template <> double from_d(double v) { return v; }
template <> __half from_d(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d(double v) { return __float2bfloat16_rn((float)v); }
double to_d(float v) { return v; } double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); } double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> int code();
template <> int code<float>() { return PYSTAGE_CUDA_FLOAT32; } template <> int code<double>() { return PYSTAGE_CUDA_FLOAT64; }
template <> int code<__half>() { return PYSTAGE_CUDA_FLOAT16; } template <> int code<__nv_bfloat16>() { return PYSTAGE_CUDA_BFLOAT16; }

// Buffers with a chosen misalignment (in elements) to exercise every unit width.
template <typename T> struct Buf {
  std::vector<unsigned char> raw; T* p;
  Buf(size_t n, int shift) : raw((n + 64) * sizeof(T) + 64) { uintptr_t a = ((uintptr_t)raw.data() + 63) & ~uintptr_t(63); p = (T*)a + shift; }
};

template <typename T>
void test_copy(int64_t outer, int64_t n_other, int64_t inner, int64_t n_idx, int shift_a, int shift_b) {
  std::vector<int64_t> perm(n_other); for (int64_t i = 0; i < n_other; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int64_t> idx(perm.begin(), perm.begin() + n_idx);
  Buf<T> big(outer * n_other * inner, shift_a), small(outer * n_idx * inner, shift_b);
  std::uniform_real_distribution<double> u(-4, 4);
  for (int64_t e = 0; e < outer * n_other * inner; ++e) big.p[e] = from_d<T>(std::round(u(rng) * 8) / 8);
  for (int64_t e = 0; e < outer * n_idx * inner; ++e) small.p[e] = from_d<T>(-1);
  EXPECT(pystage_cuda_gather_dim1(big.p, small.p, idx.data(), outer, n_other, n_idx, inner, code<T>(), 0) == cudaSuccess, "gather rc");
  for (int64_t o = 0; o < outer; ++o) for (int64_t j = 0; j < n_idx; ++j) for (int64_t i = 0; i < inner; ++i) {
    double got = to_d(small.p[(o * n_idx + j) * inner + i]), want = to_d(big.p[(o * n_other + idx[j]) * inner + i]);
    if (got != want) { EXPECT(false, "gather o=%ld j=%ld i=%ld got %g want %g", o, j, i, got, want); return; }
  }
  // scatter: dst big copy, write small*2 into rows idx
  std::vector<double> before(outer * n_other * inner);
  for (int64_t e = 0; e < (int64_t)before.size(); ++e) before[e] = to_d(big.p[e]);
  for (int64_t e = 0; e < outer * n_idx * inner; ++e) small.p[e] = from_d<T>(e % 7 + 100);
  EXPECT(pystage_cuda_scatter_dim1(big.p, small.p, idx.data(), outer, n_other, n_idx, inner, code<T>(), 0) == cudaSuccess, "scatter rc");
  std::vector<int64_t> where(n_other, -1); for (int64_t j = 0; j < n_idx; ++j) where[idx[j]] = j;
  for (int64_t o = 0; o < outer; ++o) for (int64_t k = 0; k < n_other; ++k) for (int64_t i = 0; i < inner; ++i) {
    double got = to_d(big.p[(o * n_other + k) * inner + i]);
    double want = where[k] < 0 ? before[(o * n_other + k) * inner + i] : to_d(small.p[(o * n_idx + where[k]) * inner + i]);
    if (got != want) { EXPECT(false, "scatter o=%ld k=%ld i=%ld got %g want %g", o, k, i, got, want); return; }
  }
}

template <typename T>
void test_bias(int64_t outer, int64_t channels, int64_t inner, int64_t c0, int64_t n, int shift) {
  Buf<T> g(outer * channels * inner, shift);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int64_t e = 0; e < outer * channels * inner; ++e) g.p[e] = from_d<T>(std::round(u(rng) * 64) / 64);
  std::vector<T> out(n + 1, from_d<T>(12345));
  size_t ws = pystage_cuda_bias_grad_workspace_size(outer, channels, inner, n, code<T>());
  std::vector<double> wsbuf(ws / 8 + 1);
  EXPECT(pystage_cuda_bias_grad(g.p, out.data(), outer, channels, inner, c0, n, wsbuf.data(), ws, code<T>(), 0) == cudaSuccess, "bias rc");
  if (ws > 0) EXPECT(pystage_cuda_bias_grad(g.p, out.data(), outer, channels, inner, c0, n, wsbuf.data(), ws - 1, code<T>(), 0) == cudaErrorInvalidValue, "small ws accepted");
  for (int64_t k = 0; k < n; ++k) {
    double want = 0;
    for (int64_t o = 0; o < outer; ++o) for (int64_t i = 0; i < inner; ++i) want += to_d(g.p[(o * channels + c0 + k) * inner + i]);
    double got = to_d(out[k]);
    double tol = sizeof(T) == 2 ? 1e-2 * (1 + std::fabs(want)) : 1e-9 * (1 + std::fabs(want)) + (sizeof(T) == 4 ? 1e-4 : 0);
    if (std::fabs(got - want) > tol) { EXPECT(false, "bias outer=%ld C=%ld inner=%ld c0=%ld n=%ld k=%ld got %g want %g", outer, channels, inner, c0, n, k, got, want); return; }
  }
  EXPECT(to_d(out[n]) == 12345 || sizeof(T) == 2, "bias wrote past n");
}

template <typename T>
void test_mask(int64_t out, int64_t in, int64_t inner, std::vector<int64_t> oe, std::vector<int64_t> ie, int shift) {
  Buf<T> w(out * in * inner + 8, shift);
  for (int64_t e = 0; e < out * in * inner + 8; ++e) w.p[e] = from_d<T>(1 + e % 5);
  EXPECT(pystage_cuda_block_triangular_mask(w.p, out, in, inner, oe.data(), ie.data(), (int64_t)oe.size(), code<T>(), 0) == cudaSuccess, "mask rc");
  for (int64_t o = 0; o < out; ++o) {
    size_t s = 0; while (oe[s] <= o) ++s;
    for (int64_t i = 0; i < in; ++i) for (int64_t k = 0; k < inner; ++k) {
      int64_t e = (o * in + i) * inner + k;
      double want = i >= ie[s] ? 0 : 1 + e % 5, got = to_d(w.p[e]);
      if (got != want) { EXPECT(false, "mask o=%ld i=%ld k=%ld got %g want %g", o, i, k, got, want); return; }
    }
  }
  for (int64_t e = out * in * inner; e < out * in * inner + 8; ++e) EXPECT(to_d(w.p[e]) == 1 + e % 5, "mask wrote past end");
}

template <typename T>
void test_narrow_copy(int64_t outer, int64_t channels, int64_t inner, int64_t c0, int64_t n, bool bias, int shift) {
  Buf<T> g(outer * channels * inner, shift), d(outer * n * inner + 4, 0);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int64_t e = 0; e < outer * channels * inner; ++e) g.p[e] = from_d<T>(std::round(u(rng) * 64) / 64);
  for (int64_t e = 0; e < outer * n * inner + 4; ++e) d.p[e] = from_d<T>(96);
  std::vector<T> out(n + 1, from_d<T>(12345));
  size_t ws = bias ? pystage_cuda_narrow_copy_bias_workspace_size(outer, inner, n, code<T>()) : 0;
  std::vector<double> wsbuf(ws / 8 + 1);
  EXPECT(pystage_cuda_narrow_copy_bias(g.p, d.p, bias ? out.data() : nullptr, outer, channels, inner, c0, n,
                                       wsbuf.data(), ws, code<T>(), 0) == cudaSuccess, "narrow copy rc");
  for (int64_t o = 0; o < outer; ++o) for (int64_t k = 0; k < n; ++k) for (int64_t i = 0; i < inner; ++i) {
    double got = to_d(d.p[(o * n + k) * inner + i]), want = to_d(g.p[(o * channels + c0 + k) * inner + i]);
    if (got != want) { EXPECT(false, "narrow copy o=%ld k=%ld i=%ld got %g want %g", o, k, i, got, want); return; }
  }
  for (int64_t e = outer * n * inner; e < outer * n * inner + 4; ++e) EXPECT(to_d(d.p[e]) == 96, "narrow copy wrote past end");
  if (!bias) { EXPECT(to_d(out[0]) == 12345 || sizeof(T) == 2, "copy-only wrote the bias"); return; }
  if (ws > 0) EXPECT(pystage_cuda_narrow_copy_bias(g.p, d.p, out.data(), outer, channels, inner, c0, n, wsbuf.data(),
                                                   ws - 1, code<T>(), 0) == cudaErrorInvalidValue, "small ws accepted");
  for (int64_t k = 0; k < n; ++k) {
    double want = 0;
    for (int64_t o = 0; o < outer; ++o) for (int64_t i = 0; i < inner; ++i) want += to_d(g.p[(o * channels + c0 + k) * inner + i]);
    double got = to_d(out[k]);
    double tol = sizeof(T) == 2 ? 1e-2 * (1 + std::fabs(want)) : 1e-9 * (1 + std::fabs(want)) + (sizeof(T) == 4 ? 1e-4 : 0);
    if (std::fabs(got - want) > tol) { EXPECT(false, "narrow bias outer=%ld inner=%ld k=%ld got %g want %g", outer, inner, k, got, want); return; }
  }
  EXPECT(to_d(out[n]) == 12345 || sizeof(T) == 2, "narrow bias wrote past n");
}

template <typename T>
void test_pad(int64_t outer, int64_t n, int64_t channels, int64_t inner, int64_t c0, int shift_a, int shift_b) {
  Buf<T> src(outer * n * inner + 1, shift_a), dst(outer * channels * inner + 4, shift_b);
  for (int64_t e = 0; e < outer * n * inner; ++e) src.p[e] = from_d<T>(1 + e % 11);
  for (int64_t e = 0; e < outer * channels * inner + 4; ++e) dst.p[e] = from_d<T>(-3);
  EXPECT(pystage_cuda_pad_dim1(src.p, dst.p, outer, n, channels, inner, c0, code<T>(), 0) == cudaSuccess, "pad rc");
  for (int64_t o = 0; o < outer; ++o) for (int64_t c = 0; c < channels; ++c) for (int64_t i = 0; i < inner; ++i) {
    double got = to_d(dst.p[(o * channels + c) * inner + i]);
    double want = (c >= c0 && c < c0 + n) ? to_d(src.p[(o * n + c - c0) * inner + i]) : 0;
    if (got != want) { EXPECT(false, "pad o=%ld c=%ld i=%ld got %g want %g", o, c, i, got, want); return; }
  }
  for (int64_t e = outer * channels * inner; e < outer * channels * inner + 4; ++e) EXPECT(to_d(dst.p[e]) == -3, "pad wrote past end");
}

template <typename T> void all() {
  for (int shift_a : {0, 1}) for (int shift_b : {0, 1, 3}) {
    test_copy<T>(3, 7, 1, 4, shift_a, shift_b);
    test_copy<T>(5, 9, 16, 9, shift_a, shift_b);
    test_copy<T>(2, 6, 9, 2, shift_a, shift_b);
    test_copy<T>(64, 33, 1, 17, shift_a, shift_b);
    test_copy<T>(1, 5, 49, 3, shift_a, shift_b);
  }
  for (int shift : {0, 1}) {
    test_bias<T>(7, 10, 1, 3, 5, shift);          // cols, 1 split
    test_bias<T>(1000, 12, 1, 0, 12, shift);      // cols, several splits
    test_bias<T>(300, 9, 4, 2, 6, shift);         // cols, inner 4
    test_bias<T>(3, 5, 49, 1, 3, shift);          // rows, direct
    test_bias<T>(130, 4, 64, 1, 2, shift);        // rows, splits
    test_bias<T>(40, 3, 1024, 0, 3, shift);       // rows, splits, long runs
    test_bias<T>(0, 3, 5, 0, 3, shift);           // empty sum
    test_bias<T>(4, 3, 0, 1, 2, shift);           // empty sum
  }
  for (int shift : {0, 1}) {
    test_mask<T>(6, 5, 1, {2, 4, 6}, {1, 3, 5}, shift);
    test_mask<T>(6, 5, 9, {2, 2, 6}, {1, 3, 5}, shift);   // an empty step
    test_mask<T>(4, 8, 4, {4}, {8}, shift);               // one step: nothing zeroed
    test_mask<T>(70, 40, 3, {10, 30, 70}, {0, 20, 40}, shift);
  }
  for (int shift : {0, 1}) for (bool bias : {true, false}) {
    test_narrow_copy<T>(3, 5, 49, 1, 3, bias, shift);      // direct (one split)
    test_narrow_copy<T>(130, 4, 64, 1, 2, bias, shift);    // several splits
    test_narrow_copy<T>(40, 6, 1024, 2, 4, bias, shift);   // long runs
    test_narrow_copy<T>(9, 3, 33, 0, 3, bias, shift);      // the whole tensor, a ragged run
    test_narrow_copy<T>(0, 3, 40, 1, 2, bias, shift);      // empty batch: zero bias
  }
  for (int shift : {0, 1}) test_narrow_copy<T>(17, 5, 3, 2, 2, false, shift);  // copy only: any inner
  for (int sa : {0, 1}) for (int sb : {0, 3}) {
    test_pad<T>(3, 2, 5, 9, 1, sa, sb);
    test_pad<T>(2, 4, 4, 16, 0, sa, sb);    // no padding at all
    test_pad<T>(5, 0, 3, 4, 3, sa, sb);     // nothing to place: all zeros
    test_pad<T>(4, 3, 7, 1, 4, sa, sb);     // inner 1, block at the end
  }
}

int main() {
  all<float>(); all<double>(); all<__half>(); all<__nv_bfloat16>();
  int64_t i0 = 0;
  EXPECT(pystage_cuda_gather_dim1(nullptr, nullptr, &i0, 1, 1, 1, 1, 9, 0) == cudaErrorInvalidValue, "bad dtype");
  float f[64] = {};
  EXPECT(pystage_cuda_narrow_copy_bias(f, f, f, 2, 4, 8, 0, 2, nullptr, 0, 0, 0) == cudaErrorInvalidValue, "bias with inner < 32");
  EXPECT(pystage_cuda_narrow_copy_bias(f, f, nullptr, 2, 4, 8, 3, 2, nullptr, 0, 0, 0) == cudaErrorInvalidValue, "c0 + n > channels");
  EXPECT(pystage_cuda_pad_dim1(f, f, 2, 3, 4, 1, 2, 0, 0) == cudaErrorInvalidValue, "pad past channels");
  printf("%s: %d failures, %lld launches\n", fails ? "FAILED" : "OK", fails, sim::launches);
  return fails != 0;
}
