// Conv2d -> BatchNorm2d (batch statistics) -> ReLU -> MaxPool2d(2), CPU kernels.
// The math is in ../conv_block.h. Each channel is one parallel task: the forward
// computes the channel's conv planes of all N images into a per-thread buffer (never
// [N, C, Hc, Wc]), takes the statistics, then normalizes and pools from it, and
// records each window's argmax and conv value there. The backward without d_x needs only
// those and two moments of the input patches; with d_x it recomputes the planes
// (the BN sums, then d_c and d_weight) and keeps d_c for the transposed convolution.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../conv_block.h"

namespace fastmeta {
namespace {

struct Geometry {
  int64_t N, Cin, H, W, C, KH, KW, ph, pw, Hc, Wc, Ho, Wo;
};

Geometry check_and_measure(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& gamma, const at::Tensor& beta, int64_t ph,
                           int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && x.size(1) == weight.size(1),
              "conv_block: x [N, Cin, H, W] and weight [C, Cin, KH, KW] must agree, got ",
              x.sizes(), " and ", weight.sizes());
  const int64_t C = weight.size(0);
  for (const at::Tensor* t : {&bias, &gamma, &beta}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "conv_block: bias, gamma, beta must be [",
                C, "], got ", t->sizes());
  }
  for (const at::Tensor* t : {&x, &weight, &bias, &gamma, &beta}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->is_cpu(),
                "conv_block: inputs must be contiguous CPU tensors of one dtype");
  }
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), C, weight.size(2), weight.size(3),
             ph, pw, 0, 0, 0, 0};
  g.Hc = g.H + 2 * ph - g.KH + 1;
  g.Wc = g.W + 2 * pw - g.KW + 1;
  TORCH_CHECK(ph >= 0 && pw >= 0 && g.Hc >= 2 && g.Wc >= 2,
              "conv_block: the convolution output must be at least 2x2, got ", g.Hc, "x", g.Wc);
  g.Ho = g.Hc / 2;
  g.Wo = g.Wc / 2;
  return g;
}

// c[oh, ow] = bias + sum_ci,i,j w[ci, i, j] * x[ci, oh + i - ph, ow + j - pw] (zero padded).
template <typename scalar_t>
void conv_plane(const Geometry& g, const scalar_t* x, const scalar_t* w, scalar_t bias,
                scalar_t* c) {
  std::fill(c, c + g.Hc * g.Wc, bias);
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    const scalar_t* xc = x + ci * g.H * g.W;
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t oh_lo = std::max<int64_t>(0, g.ph - i);
      const int64_t oh_hi = std::min(g.Hc, g.H + g.ph - i);
      for (int64_t j = 0; j < g.KW; ++j) {
        const scalar_t wv = w[(ci * g.KH + i) * g.KW + j];
        const int64_t ow_lo = std::max<int64_t>(0, g.pw - j);
        const int64_t ow_hi = std::min(g.Wc, g.W + g.pw - j);
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          const scalar_t* xr = xc + (oh + i - g.ph) * g.W + (j - g.pw);
          scalar_t* cr = c + oh * g.Wc;
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) cr[ow] += wv * xr[ow];
        }
      }
    }
  }
}

// y = c * scale + shift with scale = rstd * gamma, shift = beta - mean * scale, from
// the stored statistics, so the forward and the backward round y identically.
template <typename scalar_t>
std::pair<scalar_t, scalar_t> affine(scalar_t mean, scalar_t rstd, scalar_t gamma,
                                     scalar_t beta) {
  const double scale = double(rstd) * double(gamma);
  return {scalar_t(scale), scalar_t(double(beta) - double(mean) * scale)};
}

// The flat index in the conv plane of window (oh, ow)'s first maximum of relu(y),
// scanning the 2x2 window row by row as ATen's max_pool2d does.
template <typename scalar_t>
int64_t window_argmax(const Geometry& g, const scalar_t* y, int64_t oh, int64_t ow,
                      scalar_t* max_out) {
  int64_t best = (2 * oh) * g.Wc + 2 * ow;
  scalar_t best_val = std::max(y[best], scalar_t(0));
  for (int64_t k = 1; k < 4; ++k) {
    const int64_t idx = (2 * oh + k / 2) * g.Wc + 2 * ow + k % 2;
    const scalar_t v = std::max(y[idx], scalar_t(0));
    if (v > best_val || std::isnan(v)) {
      best = idx;
      best_val = v;
    }
  }
  *max_out = best_val;
  return best;
}

// Moments of the input patches, shared by every channel: S1[t] = sum over images and
// conv positions of patch tap t, G[t][u] = sum of tap t times tap u (double).
struct PatchMoments {
  std::vector<double> s1, gram;
};

constexpr int64_t kPatchChunk = 1 << 20;  // patch elements per GEMM chunk (8 MiB of double)

template <typename scalar_t>
PatchMoments patch_moments(const Geometry& g, const scalar_t* xp) {
  const int64_t taps = g.Cin * g.KH * g.KW, plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W;
  const int64_t images = std::max<int64_t>(1, kPatchChunk / (plane * taps));
  at::Tensor gram = at::zeros({taps, taps}, at::kDouble), s1 = at::zeros({taps}, at::kDouble);
  for (int64_t n0 = 0; n0 < g.N; n0 += images) {
    const int64_t n1 = std::min(g.N, n0 + images);
    at::Tensor patches = at::empty({(n1 - n0) * plane, taps}, at::kDouble);
    double* pp = patches.mutable_data_ptr<double>();
    at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        double* rows = pp + (n - n0) * plane * taps;
        for (int64_t oh = 0; oh < g.Hc; ++oh) {
          for (int64_t ow = 0; ow < g.Wc; ++ow) {
            double* row = rows + (oh * g.Wc + ow) * taps;
            for (int64_t ci = 0; ci < g.Cin; ++ci) {
              for (int64_t i = 0; i < g.KH; ++i) {
                const int64_t h = oh + i - g.ph;
                for (int64_t j = 0; j < g.KW; ++j) {
                  const int64_t w = ow + j - g.pw;
                  const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
                  *row++ = inside ? double(xp[n * in_image + (ci * g.H + h) * g.W + w]) : 0.0;
                }
              }
            }
          }
        }
      }
    });
    gram.addmm_(patches.t(), patches);
    s1.add_(patches.sum(0));
  }
  return {std::vector<double>(s1.const_data_ptr<double>(), s1.const_data_ptr<double>() + taps),
          std::vector<double>(gram.const_data_ptr<double>(),
                              gram.const_data_ptr<double>() + taps * taps)};
}

// The parameter gradients without d_x, from the forward's window offsets and conv
// values at each window's maximum: dy is nonzero only there, so
//   d_beta = sum dy, d_gamma = sum dy xhat                       (one pass over windows)
//   d_weight[t] = k (sum dy x_t - mean_dy S1[t] - mean_dy_xhat sum xhat x_t),
//   sum xhat x_t = rstd (bias S1[t] + (G w)[t] - mean S1[t])     (k = gamma rstd)
// and d_bias = k (sum dy - M mean_dy - mean_dy_xhat sum xhat) (zero up to rounding).
template <typename scalar_t>
void conv_block_parameter_grads(const Geometry& g, const scalar_t* gop, const scalar_t* xp,
                                const scalar_t* wp, const scalar_t* bp, const scalar_t* gp,
                                const scalar_t* betap, const scalar_t* mp, const scalar_t* rp,
                                const uint8_t* winp, const scalar_t* cmp, scalar_t* dwp,
                                scalar_t* dbp, scalar_t* dgp, scalar_t* dbetap) {
  const int64_t taps = g.Cin * g.KH * g.KW, in_image = g.Cin * g.H * g.W;
  const int64_t pooled = g.Ho * g.Wo;
  const PatchMoments moments = patch_moments(g, xp);
  const double count = double(g.N * g.Hc * g.Wc);
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> sparse(taps);
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t mu = mp[c], r = rp[c];
      const auto [scale, shift] = affine(mu, r, gp[c], betap[c]);
      std::fill(sparse.begin(), sparse.end(), 0.0);
      double sum_dy = 0, sum_dy_xhat = 0;
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t first = (n * g.C + c) * pooled;
        const scalar_t* xn = xp + n * in_image;
        for (int64_t o = 0; o < pooled; ++o) {
          const scalar_t cv = cmp[first + o];
          if (!(cv * scale + shift > 0)) continue;  // relu closed this window
          const double d = gop[first + o];
          sum_dy += d;
          sum_dy_xhat += d * double((cv - mu) * r);
          const int64_t h0 = 2 * (o / g.Wo) + winp[first + o] / 2 - g.ph;
          const int64_t w0 = 2 * (o % g.Wo) + winp[first + o] % 2 - g.pw;
          for (int64_t ci = 0, t = 0; ci < g.Cin; ++ci) {
            for (int64_t i = 0; i < g.KH; ++i) {
              for (int64_t j = 0; j < g.KW; ++j, ++t) {
                const int64_t h = h0 + i, w = w0 + j;
                if (h >= 0 && h < g.H && w >= 0 && w < g.W) {
                  sparse[t] += d * double(xn[(ci * g.H + h) * g.W + w]);
                }
              }
            }
          }
        }
      }
      const double k = double(gp[c]) * double(r), mean_dy = sum_dy / count;
      const double mean_dy_xhat = sum_dy_xhat / count;
      const scalar_t* w = wp + c * taps;
      double sum_c = count * double(bp[c]);
      for (int64_t t = 0; t < taps; ++t) sum_c += double(w[t]) * moments.s1[t];
      for (int64_t t = 0; t < taps; ++t) {
        double gw = 0;
        for (int64_t u = 0; u < taps; ++u) gw += moments.gram[t * taps + u] * double(w[u]);
        const double sum_xhat_x =
            double(r) * (double(bp[c]) * moments.s1[t] + gw - double(mu) * moments.s1[t]);
        dwp[c * taps + t] =
            scalar_t(k * (sparse[t] - mean_dy * moments.s1[t] - mean_dy_xhat * sum_xhat_x));
      }
      const double sum_xhat = double(r) * (sum_c - count * double(mu));
      dbp[c] = scalar_t(k * (sum_dy - count * mean_dy - mean_dy_xhat * sum_xhat));
      dgp[c] = scalar_t(sum_dy_xhat);
      dbetap[c] = scalar_t(sum_dy);
    }
  });
}

}  // namespace

ConvBlockForward conv_block_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& gamma,
                                        const at::Tensor& beta, int64_t pad_h, int64_t pad_w,
                                        double eps) {
  const Geometry g = check_and_measure(x, weight, bias, gamma, beta, pad_h, pad_w);
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options());
  at::Tensor mean = at::empty({g.C}, x.options());
  at::Tensor rstd = at::empty({g.C}, x.options());
  at::Tensor window = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().dtype(at::kByte));
  at::Tensor c_max = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options());
  const int64_t plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W, taps = g.Cin * g.KH * g.KW;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
    const scalar_t* betap = beta.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rp = rstd.mutable_data_ptr<scalar_t>();
    uint8_t* winp = window.mutable_data_ptr<uint8_t>();
    scalar_t* cmp = c_max.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      // The channel's conv planes of all N images, computed once (N * Hc * Wc per thread).
      std::vector<scalar_t> cbuf(g.N * plane), ybuf(plane);
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* w = wp + c * taps;
        double sum = 0, sumsq = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          scalar_t* cn = cbuf.data() + n * plane;
          conv_plane(g, xp + n * in_image, w, bp[c], cn);
          scalar_t s1 = 0, s2 = 0;  // one plane in scalar_t (vectorized), planes in double
_Pragma("omp simd reduction(+ : s1, s2)")
          for (int64_t k = 0; k < plane; ++k) {
            s1 += cn[k];
            s2 += cn[k] * cn[k];
          }
          sum += s1;
          sumsq += s2;
        }
        const double count = double(g.N * plane);
        const double mu = sum / count;
        const double var = std::max(sumsq / count - mu * mu, 0.0);
        mp[c] = scalar_t(mu);
        rp[c] = scalar_t(1.0 / std::sqrt(var + eps));
        const auto [scale, shift] = affine(mp[c], rp[c], gp[c], betap[c]);
        for (int64_t n = 0; n < g.N; ++n) {
          const scalar_t* cn = cbuf.data() + n * plane;
          for (int64_t k = 0; k < plane; ++k) ybuf[k] = cn[k] * scale + shift;
          const int64_t first = (n * g.C + c) * g.Ho * g.Wo;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            for (int64_t ow = 0; ow < g.Wo; ++ow) {
              const int64_t o = first + oh * g.Wo + ow;
              const int64_t best = window_argmax(g, ybuf.data(), oh, ow, &op[o]);
              winp[o] = uint8_t((best / g.Wc - 2 * oh) * 2 + best % g.Wc - 2 * ow);
              cmp[o] = cn[best];
            }
          }
        }
      }
    });
  });
  return {out, mean, rstd, window, c_max};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& window,
    const at::Tensor& c_max, int64_t pad_h, int64_t pad_w, bool need_x) {
  const Geometry g = check_and_measure(x, weight, bias, gamma, beta, pad_h, pad_w);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}),
              "conv_block: grad_out must be contiguous [", g.N, ", ", g.C, ", ", g.Ho, ", ",
              g.Wo, "], got ", grad_out.sizes());
  TORCH_CHECK(mean.numel() == g.C && rstd.numel() == g.C && mean.is_contiguous() &&
                  rstd.is_contiguous(),
              "conv_block: mean and rstd must be [", g.C, "]");
  at::Tensor d_weight = at::empty_like(weight);
  at::Tensor d_bias = at::empty_like(bias);
  at::Tensor d_gamma = at::empty_like(gamma);
  at::Tensor d_beta = at::empty_like(beta);
  if (!need_x) {
    TORCH_CHECK(window.scalar_type() == at::kByte && window.sizes() == grad_out.sizes() &&
                    c_max.sizes() == grad_out.sizes() && window.is_contiguous() &&
                    c_max.is_contiguous() && c_max.scalar_type() == x.scalar_type(),
                "conv_block: window (uint8) and c_max must be contiguous ", grad_out.sizes());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_parameter_grads_cpu", [&] {
      conv_block_parameter_grads(
          g, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
          gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
          window.const_data_ptr<uint8_t>(), c_max.const_data_ptr<scalar_t>(),
          d_weight.mutable_data_ptr<scalar_t>(), d_bias.mutable_data_ptr<scalar_t>(),
          d_gamma.mutable_data_ptr<scalar_t>(), d_beta.mutable_data_ptr<scalar_t>());
    });
    return {at::empty({0}, x.options()), d_weight, d_bias, d_gamma, d_beta};
  }
  // With d_x: the dense path. d_c [N, C, Hc, Wc] is kept for the transposed convolution.
  at::Tensor d_c = at::empty({g.N, g.C, g.Hc, g.Wc}, x.options());
  const int64_t plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W, taps = g.Cin * g.KH * g.KW;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_backward_cpu", [&] {
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
    const scalar_t* betap = beta.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* rp = rstd.const_data_ptr<scalar_t>();
    scalar_t* dwp = d_weight.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = d_bias.mutable_data_ptr<scalar_t>();
    scalar_t* dgp = d_gamma.mutable_data_ptr<scalar_t>();
    scalar_t* dbetap = d_beta.mutable_data_ptr<scalar_t>();
    scalar_t* dcp = d_c.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> cbuf(plane), ybuf(plane), dy(plane);
      std::vector<double> dw(taps);
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* w = wp + c * taps;
        const scalar_t mu = mp[c], r = rp[c], gam = gp[c];
        const auto [scale, shift] = affine(mu, r, gam, betap[c]);
        // Image n: xhat into cbuf, and dy (zero but at each window's first maximum
        // of relu(y), where y > 0) into dy.
        auto pooled_grad = [&](int64_t n) {
          conv_plane(g, xp + n * in_image, w, bp[c], cbuf.data());
          for (int64_t k = 0; k < plane; ++k) {
            ybuf[k] = cbuf[k] * scale + shift;
            cbuf[k] = (cbuf[k] - mu) * r;
          }
          std::fill(dy.begin(), dy.end(), scalar_t(0));
          const scalar_t* go = gop + (n * g.C + c) * g.Ho * g.Wo;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            for (int64_t ow = 0; ow < g.Wo; ++ow) {
              scalar_t max_val;
              const int64_t best = window_argmax(g, ybuf.data(), oh, ow, &max_val);
              if (ybuf[best] > 0) dy[best] += go[oh * g.Wo + ow];
            }
          }
        };
        double sum_dy = 0, sum_dy_xhat = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          pooled_grad(n);
          scalar_t s1 = 0, s2 = 0;
_Pragma("omp simd reduction(+ : s1, s2)")
          for (int64_t k = 0; k < plane; ++k) {
            s1 += dy[k];
            s2 += dy[k] * cbuf[k];
          }
          sum_dy += s1;
          sum_dy_xhat += s2;
        }
        dbetap[c] = scalar_t(sum_dy);
        dgp[c] = scalar_t(sum_dy_xhat);
        const double count = double(g.N * plane);
        const scalar_t k_scale = gam * r;
        const scalar_t mean_dy = scalar_t(sum_dy / count);
        const scalar_t mean_dy_xhat = scalar_t(sum_dy_xhat / count);
        std::fill(dw.begin(), dw.end(), 0.0);
        double db = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          pooled_grad(n);
          scalar_t* dc = dcp + (n * g.C + c) * plane;
          scalar_t s1 = 0;
_Pragma("omp simd reduction(+ : s1)")
          for (int64_t k = 0; k < plane; ++k) {
            dc[k] = k_scale * (dy[k] - mean_dy - cbuf[k] * mean_dy_xhat);
            s1 += dc[k];
          }
          db += s1;
          const scalar_t* xn = xp + n * in_image;
          for (int64_t ci = 0; ci < g.Cin; ++ci) {
            for (int64_t i = 0; i < g.KH; ++i) {
              const int64_t oh_lo = std::max<int64_t>(0, g.ph - i);
              const int64_t oh_hi = std::min(g.Hc, g.H + g.ph - i);
              for (int64_t j = 0; j < g.KW; ++j) {
                const int64_t ow_lo = std::max<int64_t>(0, g.pw - j);
                const int64_t ow_hi = std::min(g.Wc, g.W + g.pw - j);
                scalar_t acc = 0;
                for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
                  const scalar_t* xr = xn + ci * g.H * g.W + (oh + i - g.ph) * g.W + (j - g.pw);
                  const scalar_t* dr = dc + oh * g.Wc;
_Pragma("omp simd reduction(+ : acc)")
                  for (int64_t ow = ow_lo; ow < ow_hi; ++ow) acc += dr[ow] * xr[ow];
                }
                dw[(ci * g.KH + i) * g.KW + j] += acc;
              }
            }
          }
        }
        for (int64_t t = 0; t < taps; ++t) dwp[c * taps + t] = scalar_t(dw[t]);
        dbp[c] = scalar_t(db);
      }
    });
  });
  at::Tensor d_x = at::zeros_like(x);
  {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_backward_x_cpu", [&] {
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      const scalar_t* dcp = d_c.const_data_ptr<scalar_t>();
      scalar_t* dxp = d_x.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t task = b0; task < b1; ++task) {
          const int64_t n = task / g.Cin, ci = task % g.Cin;
          scalar_t* dx = dxp + task * g.H * g.W;
          for (int64_t c = 0; c < g.C; ++c) {
            const scalar_t* dc = dcp + (n * g.C + c) * plane;
            for (int64_t i = 0; i < g.KH; ++i) {
              const int64_t oh_lo = std::max<int64_t>(0, g.ph - i);
              const int64_t oh_hi = std::min(g.Hc, g.H + g.ph - i);
              for (int64_t j = 0; j < g.KW; ++j) {
                const scalar_t wv = wp[((c * g.Cin + ci) * g.KH + i) * g.KW + j];
                const int64_t ow_lo = std::max<int64_t>(0, g.pw - j);
                const int64_t ow_hi = std::min(g.Wc, g.W + g.pw - j);
                for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
                  scalar_t* xr = dx + (oh + i - g.ph) * g.W + (j - g.pw);
                  const scalar_t* dr = dc + oh * g.Wc;
                  for (int64_t ow = ow_lo; ow < ow_hi; ++ow) xr[ow] += wv * dr[ow];
                }
              }
            }
          }
        }
      });
    });
  }
  return {d_x, d_weight, d_bias, d_gamma, d_beta};
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("conv_block_forward", &conv_block_forward_cpu);
  m.impl("conv_block_backward", &conv_block_backward_cpu);
}

}  // namespace fastmeta
