// Direct CPU kernels for the backward of a masked conv2d with few trainable units.
//
// oneDNN's convolution backward is fast for wide layers but pays a fixed cost
// per call (layout reorders of x, primitive setup) that dominates when only a
// few output channels are trainable: then the whole dW is ~T*C*k*k dot
// products over the batch's pixels, which fit in L1 plane by plane. These
// kernels compute, for float32, stride 1, dilation 1:
//   dW[o, c, i, j] = sum_{b,h,w} gy[b, o, h, w] * xpad[b, c, h + i, w + j]   (o < T, c < in_active)
//   dX[b, c, h, w] = sum_{o,i,j} w[o, c, i, j] * gy[b, o, h + ph - i, w + pw - j]   (c in [in_split, in_active))
// with 8-wide vectors along w; each plane of x is read once per channel.
//
// dW is register-blocked over output units: for one tap row i, a row of x is loaded once per vector (KW
// unaligned loads) and multiplied into the gradients of OB units at once, OB * KW accumulators held in
// registers. Per vector of output that is KW + OB loads for OB * KW FMAs instead of 1 + KH * KW loads for
// KH * KW FMAs one unit at a time: the kernel stops being bound by loads. OB is 4 with AVX2's 16 vector
// registers and 8 where AVX-512VL gives the same 8-wide code 32 registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace pystage {
namespace {

constexpr int64_t V = 8;
typedef float vf __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4)));

inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline float hsum(vf v) {
  float s = 0;
  for (int k = 0; k < V; ++k) s += v[k];
  return s;
}
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#if defined(__x86_64__) && defined(__GNUC__)
#define PYSTAGE_HAS_AVX2_CLONE 1
#define PYSTAGE_AVX2 __attribute__((target("avx2,fma")))
#else
#define PYSTAGE_HAS_AVX2_CLONE 0
#define PYSTAGE_AVX2
#endif

// Units o < OB, tap row i: acc[(o*KH + i)*KW + j] += sum over e < len of g_o[e] * xp[e + i*pitch + j], g_o = g +
// o * g_unit. The planes are flat: g_o holds a unit's output-gradient plane with x's row pitch (zeros in the
// KW - 1 columns past each row), so one long loop covers the plane (no short row loops) and the padding
// columns add exact zeros. len % 8 == 0; acc holds vectors, summed at the end.
#define PYSTAGE_PLANE_WGRAD_BODY                                                  \
  for (int i = 0; i < KH; ++i) {                                                  \
    const float* xi = xp + i * pitch;                                             \
    vf a[OB][KW];                                                                 \
    for (int o = 0; o < OB; ++o)                                                  \
      for (int j = 0; j < KW; ++j) a[o][j] = acc[(o * KH + i) * KW + j];          \
    for (int64_t e = 0; e < len; e += V) {                                        \
      vf xv[KW];                                                                  \
      for (int j = 0; j < KW; ++j) xv[j] = loadu(xi + e + j);                     \
      for (int o = 0; o < OB; ++o) {                                              \
        const vf gv = loadu(g + o * g_unit + e);                                  \
        for (int j = 0; j < KW; ++j) a[o][j] += gv * xv[j];                       \
      }                                                                           \
    }                                                                             \
    for (int o = 0; o < OB; ++o)                                                  \
      for (int j = 0; j < KW; ++j) acc[(o * KH + i) * KW + j] = a[o][j];          \
  }

// Input channels c < CB: out[c*len + e] = sum_{o,i,j} wf[c*c_unit + (o*KH + i)*KW + j] * gp[o*plane + e + i*pitch + j]
// for e < len (flat output planes with the padded gradient's pitch; columns past W are discarded by the caller).
// A gradient vector is loaded once per (o, i, j) and used for CB channels (CB accumulators in registers).
#define PYSTAGE_PLANE_XGRAD_BODY                                                  \
  for (int64_t e = 0; e < len; e += V) {                                          \
    vf a[CB];                                                                     \
    for (int c = 0; c < CB; ++c) a[c] = vf{};                                     \
    for (int64_t o = 0; o < units; ++o) {                                         \
      const float* go = gp + o * plane + e;                                       \
      const float* wo = wf + o * KH * KW;                                         \
      for (int i = 0; i < KH; ++i)                                                \
        for (int j = 0; j < KW; ++j) {                                            \
          const vf gv = loadu(go + i * pitch + j);                                \
          for (int c = 0; c < CB; ++c) a[c] += gv * wo[c * c_unit + i * KW + j]; \
        }                                                                         \
    }                                                                             \
    for (int c = 0; c < CB; ++c) storeu(out + c * len + e, a[c]);                \
  }

#if defined(__x86_64__) && defined(__GNUC__)
#define PYSTAGE_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))
#else
#define PYSTAGE_AVX512
#endif

template <int KH, int KW, int OB>
void plane_wgrad_generic(const float* g, int64_t g_unit, int64_t len, const float* xp, int64_t pitch, vf* acc) {
  PYSTAGE_PLANE_WGRAD_BODY
}
template <int KH, int KW, int OB>
PYSTAGE_AVX2 void plane_wgrad_avx2(const float* g, int64_t g_unit, int64_t len, const float* xp,
                                   int64_t pitch, vf* acc) {
  PYSTAGE_PLANE_WGRAD_BODY
}
template <int KH, int KW, int OB>
PYSTAGE_AVX512 void plane_wgrad_avx512(const float* g, int64_t g_unit, int64_t len, const float* xp,
                                       int64_t pitch, vf* acc) {
  PYSTAGE_PLANE_WGRAD_BODY
}
#define PYSTAGE_XGRAD_ARGS                                                                                       \
  const float *gp, int64_t units, int64_t plane, int64_t len, int64_t pitch, const float *wf, int64_t c_unit, float *out
template <int KH, int KW, int CB>
void plane_xgrad_generic(PYSTAGE_XGRAD_ARGS) {
  PYSTAGE_PLANE_XGRAD_BODY
}
template <int KH, int KW, int CB>
PYSTAGE_AVX2 void plane_xgrad_avx2(PYSTAGE_XGRAD_ARGS) {
  PYSTAGE_PLANE_XGRAD_BODY
}
template <int KH, int KW, int CB>
PYSTAGE_AVX512 void plane_xgrad_avx512(PYSTAGE_XGRAD_ARGS) {
  PYSTAGE_PLANE_XGRAD_BODY
}

// AVX2 + FMA when the CPU has them (checked once, by feature, not by CPU model).
inline bool use_avx2() {
#if PYSTAGE_HAS_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// AVX-512F + VL (the 8-wide code with 32 vector registers), checked once.
inline bool use_avx512() {
#if PYSTAGE_HAS_AVX2_CLONE
  static const bool ok = use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Instruction set of the dW kernels: 2 AVX-512VL, 1 AVX2+FMA, 0 generic; the CPU's best unless
// PYSTAGE_CONV_DIRECT_ISA (avx2, generic) asks for less (to test and time each variant).
int isa_level() {
  const int best = use_avx512() ? 2 : (use_avx2() ? 1 : 0);
  const char* env = std::getenv("PYSTAGE_CONV_DIRECT_ISA");
  if (env == nullptr) return best;
  const std::string want(env);
  return std::min(best, want == "generic" ? 0 : (want == "avx2" ? 1 : 2));
}

// Units per register block: accumulators (OB * KW) + KW x vectors + 1 gradient vector fit the register file.
template <int KW>
int max_block(int isa) {
  const int regs = isa == 2 ? 32 : 16;
  const int ob = (regs - KW - 1) / KW;
  return ob < 1 ? 1 : (ob > 8 ? 8 : ob);
}

template <int KH, int KW, int OB>
void plane_wgrad_isa(int isa, const float* g, int64_t g_unit, int64_t len, const float* xp, int64_t pitch, vf* acc) {
  if (isa == 2) plane_wgrad_avx512<KH, KW, OB>(g, g_unit, len, xp, pitch, acc);
  else if (isa == 1) plane_wgrad_avx2<KH, KW, OB>(g, g_unit, len, xp, pitch, acc);
  else plane_wgrad_generic<KH, KW, OB>(g, g_unit, len, xp, pitch, acc);
}

// Units [0, n) of one plane pair, n <= 8, as one register block.
template <int KH, int KW>
void plane_wgrad(int isa, int n, const float* g, int64_t g_unit, int64_t len, const float* xp, int64_t pitch, vf* acc) {
  switch (n) {
    case 1: return plane_wgrad_isa<KH, KW, 1>(isa, g, g_unit, len, xp, pitch, acc);
    case 2: return plane_wgrad_isa<KH, KW, 2>(isa, g, g_unit, len, xp, pitch, acc);
    case 3: return plane_wgrad_isa<KH, KW, 3>(isa, g, g_unit, len, xp, pitch, acc);
    case 4: return plane_wgrad_isa<KH, KW, 4>(isa, g, g_unit, len, xp, pitch, acc);
    case 5: return plane_wgrad_isa<KH, KW, 5>(isa, g, g_unit, len, xp, pitch, acc);
    case 6: return plane_wgrad_isa<KH, KW, 6>(isa, g, g_unit, len, xp, pitch, acc);
    case 7: return plane_wgrad_isa<KH, KW, 7>(isa, g, g_unit, len, xp, pitch, acc);
    default: return plane_wgrad_isa<KH, KW, 8>(isa, g, g_unit, len, xp, pitch, acc);
  }
}

template <int KH, int KW, int CB>
void plane_xgrad_isa(int isa, PYSTAGE_XGRAD_ARGS) {
  if (isa == 2) plane_xgrad_avx512<KH, KW, CB>(gp, units, plane, len, pitch, wf, c_unit, out);
  else if (isa == 1) plane_xgrad_avx2<KH, KW, CB>(gp, units, plane, len, pitch, wf, c_unit, out);
  else plane_xgrad_generic<KH, KW, CB>(gp, units, plane, len, pitch, wf, c_unit, out);
}

// Input channels [0, n) as one register block, n <= 8 (8 accumulators + a gradient vector fit AVX2's 16 registers).
template <int KH, int KW>
void plane_xgrad(int isa, int n, PYSTAGE_XGRAD_ARGS) {
  switch (n) {
    case 1: return plane_xgrad_isa<KH, KW, 1>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 2: return plane_xgrad_isa<KH, KW, 2>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 3: return plane_xgrad_isa<KH, KW, 3>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 4: return plane_xgrad_isa<KH, KW, 4>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 5: return plane_xgrad_isa<KH, KW, 5>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 6: return plane_xgrad_isa<KH, KW, 6>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    case 7: return plane_xgrad_isa<KH, KW, 7>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
    default: return plane_xgrad_isa<KH, KW, 8>(isa, gp, units, plane, len, pitch, wf, c_unit, out);
  }
}

struct Geometry {
  int64_t B, C, H, W, Ho, Wo, kh, kw, ph, pw;
};

template <int KH, int KW>
void weight_grad(const Geometry& g, const float* gy, const float* x, int64_t T, int64_t in_active, float* gw_out) {
  const int64_t pitch = g.W + 2 * g.pw, xh = g.H + 2 * g.ph;  // padded x plane; Wo = pitch - KW + 1 (stride 1)
  const int64_t len = round_up(g.Ho * pitch, V);               // flat output plane, whole vectors
  const int64_t x_floats = xh * pitch + 2 * V;                 // reads reach len + (KH-1)*pitch + KW - 1 + V
  // gy as flat planes with x's pitch: (B, T, len), zeros past each row's Wo and past Ho * pitch.
  std::vector<float> gp(static_cast<size_t>(g.B * T * len), 0.f);
  at::parallel_for(0, g.B * T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      for (int64_t h = 0; h < g.Ho; ++h)
        std::memcpy(&gp[p * len + h * pitch], gy + (p * g.Ho + h) * g.Wo, sizeof(float) * g.Wo);
  });
  const int isa = isa_level(), ob = max_block<KW>(isa);
  at::parallel_for(0, in_active, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xp(static_cast<size_t>(x_floats), 0.f);  // one padded x plane; borders stay zero
    const int64_t n_acc = (c1 - c0) * T * KH * KW;               // vector accumulators of this chunk's channels
    std::vector<float> acc_buf(static_cast<size_t>((n_acc + 1) * V), 0.f);
    vf* acc = reinterpret_cast<vf*>((reinterpret_cast<uintptr_t>(acc_buf.data()) + 31) & ~uintptr_t(31));
    for (int64_t b = 0; b < g.B; ++b) {  // batch outer: a sample's gradient planes stay in cache across channels
      for (int64_t c = c0; c < c1; ++c) {
        const float* plane = x + (b * g.C + c) * g.H * g.W;
        for (int64_t r = 0; r < g.H; ++r)
          std::memcpy(&xp[(r + g.ph) * pitch + g.pw], plane + r * g.W, sizeof(float) * g.W);
        for (int64_t o = 0; o < T; o += ob) {
          const int n = static_cast<int>(std::min<int64_t>(ob, T - o));
          plane_wgrad<KH, KW>(isa, n, &gp[(b * T + o) * len], len, len, xp.data(), pitch,
                              acc + ((c - c0) * T + o) * KH * KW);
        }
      }
    }
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t k = 0; k < T * KH * KW; ++k) {
        const int64_t o = k / (KH * KW), tap = k % (KH * KW);
        gw_out[(o * in_active + c) * KH * KW + tap] = hsum(acc[(c - c0) * T * KH * KW + k]);
      }
  });
}

template <int KH, int KW>
void input_grad(const Geometry& g, const float* gy, const float* w, int64_t T, int64_t in_active, int64_t in_split,
                float* gx) {
  // gy fully padded (KH-1-ph rows above, KW-1-pw columns left): gh rows of pitch floats; dX planes are flat with the
  // same pitch (H rows, columns past W discarded).
  const int64_t pitch = g.W + KW - 1, gh = g.H + KH - 1, top = KH - 1 - g.ph, left = KW - 1 - g.pw;
  const int64_t len = round_up(g.H * pitch, V), plane = gh * pitch + 2 * V + KW;  // reads reach len + (KH-1)*pitch + KW + V
  const int64_t n_in = in_active - in_split, c_unit = T * KH * KW;
  // flipped weights of the trainable inputs: wf[c][o][i][j] = w[o][in_split + c][KH-1-i][KW-1-j]
  std::vector<float> wf(static_cast<size_t>(n_in * c_unit));
  for (int64_t c = 0; c < n_in; ++c)
    for (int64_t o = 0; o < T; ++o)
      for (int i = 0; i < KH; ++i)
        for (int j = 0; j < KW; ++j)
          wf[((c * T + o) * KH + i) * KW + j] = w[((o * in_active + in_split + c) * KH + (KH - 1 - i)) * KW + (KW - 1 - j)];
  const int isa = isa_level();
  constexpr int kBlock = 8;
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> gp(static_cast<size_t>(T * plane), 0.f);  // borders stay zero; interiors rewritten per sample
    std::vector<float> out(static_cast<size_t>(kBlock * len));
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t o = 0; o < T; ++o)
        for (int64_t r = 0; r < g.Ho; ++r)
          std::memcpy(&gp[o * plane + (r + top) * pitch + left], gy + ((b * T + o) * g.Ho + r) * g.Wo,
                      sizeof(float) * g.Wo);
      for (int64_t c = 0; c < n_in; c += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, n_in - c));
        plane_xgrad<KH, KW>(isa, n, gp.data(), T, plane, len, pitch, &wf[c * c_unit], c_unit, out.data());
        for (int k = 0; k < n; ++k) {
          float* dst = gx + (b * g.C + in_split + c + k) * g.H * g.W;
          for (int64_t r = 0; r < g.H; ++r) std::memcpy(dst + r * g.W, &out[k * len + r * pitch], sizeof(float) * g.W);
        }
      }
    }
  });
}

template <int KH, int KW>
void run(const Geometry& g, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, int64_t in_split,
         at::Tensor* gx, at::Tensor* gw) {
  const int64_t T = w.size(0), in_active = w.size(1);
  if (gw) weight_grad<KH, KW>(g, gy.data_ptr<float>(), x.data_ptr<float>(), T, in_active, gw->data_ptr<float>());
  if (gx && in_active > in_split)
    input_grad<KH, KW>(g, gy.data_ptr<float>(), w.data_ptr<float>(), T, in_active, in_split, gx->data_ptr<float>());
}

// Below this many trainable units the direct kernels beat oneDNN on the CPUs measured (bench/RESULTS.md).
int64_t direct_threshold() {
  const char* env = std::getenv("PYSTAGE_CONV_DIRECT_MAX_UNITS");
  return env ? std::atoll(env) : 16;
}

}  // namespace

bool conv2d_grads_direct(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, int64_t in_split,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor* gx,
                         at::Tensor* gw) {
  const int64_t kh = w.size(2), kw = w.size(3);
  if (x.scalar_type() != at::kFloat || w.size(0) > direct_threshold()) return false;
  if (stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1) return false;
  if (padding[0] > kh - 1 || padding[1] > kw - 1 || !gy.is_contiguous() || !x.is_contiguous()) return false;
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), gy.size(2), gy.size(3), kh, kw, padding[0], padding[1]};
  if (g.Ho <= 0 || g.Wo <= 0) return false;
  if (gx) *gx = at::zeros_like(x);
  if (gw) *gw = at::empty_like(w);
  auto wc = w.contiguous();
  if (kh == 3 && kw == 3) run<3, 3>(g, gy, x, wc, in_split, gx, gw);
  else if (kh == 1 && kw == 1) run<1, 1>(g, gy, x, wc, in_split, gx, gw);
  else if (kh == 5 && kw == 5) run<5, 5>(g, gy, x, wc, in_split, gx, gw);
  else return false;
  return true;
}

}  // namespace pystage
