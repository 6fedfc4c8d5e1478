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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
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

// acc[i*KW+j] += sum over the plane of g[h][w] * xp[h+i][w+j]; g has rows of gw floats, xp rows of xw floats.
#define PYSTAGE_PLANE_WGRAD_BODY                                                  \
  vf acc[KH * KW];                                                                \
  for (int k = 0; k < KH * KW; ++k) acc[k] = vf{};                                \
  for (int64_t h = 0; h < rows; ++h) {                                            \
    const float* grow = g + h * gw;                                               \
    for (int64_t w0 = 0; w0 < gw; w0 += V) {                                      \
      vf gv = loadu(grow + w0);                                                   \
      for (int i = 0; i < KH; ++i) {                                              \
        const float* xr = xp + (h + i) * xw + w0;                                 \
        for (int j = 0; j < KW; ++j) acc[i * KW + j] += gv * loadu(xr + j);       \
      }                                                                           \
    }                                                                             \
  }                                                                               \
  for (int k = 0; k < KH * KW; ++k) out[k] += hsum(acc[k]);

// out[h][w0..w0+8) = sum_{o,i,j} wf[o][i][j] * gp[o][h+i][w+j] over one output plane (rows x ow, ow % 8 == 0).
#define PYSTAGE_PLANE_XGRAD_BODY                                                  \
  for (int64_t h = 0; h < rows; ++h) {                                            \
    for (int64_t w0 = 0; w0 < ow; w0 += V) {                                      \
      vf acc0 = vf{}, acc1 = vf{};                                                \
      for (int64_t o = 0; o < units; ++o) {                                       \
        const float* gpo = gp + o * plane + h * gw + w0;                          \
        const float* wo = wf + o * KH * KW;                                       \
        for (int i = 0; i < KH; ++i) {                                            \
          for (int j = 0; j < KW; ++j) {                                          \
            vf v = loadu(gpo + i * gw + j) * wo[i * KW + j];                      \
            if ((i + j) & 1) acc1 += v; else acc0 += v;                           \
          }                                                                       \
        }                                                                         \
      }                                                                           \
      storeu(out + h * ow + w0, acc0 + acc1);                                     \
    }                                                                             \
  }

template <int KH, int KW>
void plane_wgrad_generic(const float* g, int64_t rows, int64_t gw, const float* xp, int64_t xw, float* out) {
  PYSTAGE_PLANE_WGRAD_BODY
}
template <int KH, int KW>
PYSTAGE_AVX2 void plane_wgrad_avx2(const float* g, int64_t rows, int64_t gw, const float* xp, int64_t xw, float* out) {
  PYSTAGE_PLANE_WGRAD_BODY
}
template <int KH, int KW>
void plane_xgrad_generic(const float* gp, int64_t units, int64_t plane, int64_t rows, int64_t ow, int64_t gw,
                         const float* wf, float* out) {
  PYSTAGE_PLANE_XGRAD_BODY
}
template <int KH, int KW>
PYSTAGE_AVX2 void plane_xgrad_avx2(const float* gp, int64_t units, int64_t plane, int64_t rows, int64_t ow, int64_t gw,
                                   const float* wf, float* out) {
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

template <int KH, int KW>
void plane_wgrad(const float* g, int64_t rows, int64_t gw, const float* xp, int64_t xw, float* out) {
  if (use_avx2()) plane_wgrad_avx2<KH, KW>(g, rows, gw, xp, xw, out);
  else plane_wgrad_generic<KH, KW>(g, rows, gw, xp, xw, out);
}

template <int KH, int KW>
void plane_xgrad(const float* gp, int64_t units, int64_t plane, int64_t rows, int64_t ow, int64_t gw, const float* wf,
                 float* out) {
  if (use_avx2()) plane_xgrad_avx2<KH, KW>(gp, units, plane, rows, ow, gw, wf, out);
  else plane_xgrad_generic<KH, KW>(gp, units, plane, rows, ow, gw, wf, out);
}

struct Geometry {
  int64_t B, C, H, W, Ho, Wo, kh, kw, ph, pw;
};

template <int KH, int KW>
void weight_grad(const Geometry& g, const float* gy, const float* x, int64_t T, int64_t in_active, float* gw_out) {
  const int64_t wr = round_up(g.Wo, V), xw = wr + KW - 1, xh = g.Ho + KH - 1;
  // gy padded to whole vectors: (B, T, Ho, wr), zeros beyond Wo.
  std::vector<float> gp(static_cast<size_t>(g.B * T * g.Ho * wr), 0.f);
  at::parallel_for(0, g.B * T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      for (int64_t h = 0; h < g.Ho; ++h)
        std::memcpy(&gp[(p * g.Ho + h) * wr], gy + (p * g.Ho + h) * g.Wo, sizeof(float) * g.Wo);
  });
  std::memset(gw_out, 0, sizeof(float) * T * in_active * KH * KW);
  at::parallel_for(0, in_active, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xp(static_cast<size_t>(xh * xw), 0.f);  // one padded x plane; borders stay zero
    std::vector<float> acc(static_cast<size_t>(T * KH * KW));
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < g.B; ++b) {
        const float* plane = x + (b * g.C + c) * g.H * g.W;
        for (int64_t r = 0; r < g.H; ++r) std::memcpy(&xp[(r + g.ph) * xw + g.pw], plane + r * g.W, sizeof(float) * g.W);
        for (int64_t o = 0; o < T; ++o)
          plane_wgrad<KH, KW>(&gp[(b * T + o) * g.Ho * wr], g.Ho, wr, xp.data(), xw, &acc[o * KH * KW]);
      }
      for (int64_t o = 0; o < T; ++o)
        std::memcpy(gw_out + (o * in_active + c) * KH * KW, &acc[o * KH * KW], sizeof(float) * KH * KW);
    }
  });
}

template <int KH, int KW>
void input_grad(const Geometry& g, const float* gy, const float* w, int64_t T, int64_t in_active, int64_t in_split,
                float* gx) {
  const int64_t ow = round_up(g.W, V), top = KH - 1 - g.ph, left = KW - 1 - g.pw;
  const int64_t gw = ow + KW - 1, gh = g.H + KH - 1, plane = gh * gw;
  const int64_t n_in = in_active - in_split;
  // flipped weights of the trainable inputs: wf[c][o][i][j] = w[o][in_split + c][KH-1-i][KW-1-j]
  std::vector<float> wf(static_cast<size_t>(n_in * T * KH * KW));
  for (int64_t c = 0; c < n_in; ++c)
    for (int64_t o = 0; o < T; ++o)
      for (int i = 0; i < KH; ++i)
        for (int j = 0; j < KW; ++j)
          wf[((c * T + o) * KH + i) * KW + j] = w[((o * in_active + in_split + c) * KH + (KH - 1 - i)) * KW + (KW - 1 - j)];
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> gp(static_cast<size_t>(T * plane), 0.f);
    std::vector<float> out(static_cast<size_t>(g.H * ow));
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t o = 0; o < T; ++o)
        for (int64_t r = 0; r < g.Ho; ++r) {
          int64_t row = r + top;
          if (row < 0 || row >= gh) continue;
          std::memcpy(&gp[o * plane + row * gw + left], gy + ((b * T + o) * g.Ho + r) * g.Wo, sizeof(float) * g.Wo);
        }
      for (int64_t c = 0; c < n_in; ++c) {
        plane_xgrad<KH, KW>(gp.data(), T, plane, g.H, ow, gw, &wf[c * T * KH * KW], out.data());
        float* dst = gx + (b * g.C + in_split + c) * g.H * g.W;
        for (int64_t r = 0; r < g.H; ++r) std::memcpy(dst + r * g.W, &out[r * ow], sizeof(float) * g.W);
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
  return env ? std::atoll(env) : 4;
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
