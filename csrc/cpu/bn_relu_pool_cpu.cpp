// The rest of a conv4 block after a convolution ATen computes, as one op:
// BatchNorm2d with batch statistics -> ReLU -> MaxPool2d(2) on c [N, C, H, W].
//   mean_c, rstd_c over (N, H, W) (biased variance);  k = gamma rstd
//   y = (c - mean) k + beta,  out = maxpool2(relu(y)) [N, C, H/2, W/2]
// The forward records where each 2x2 window's first maximum is (window, uint8
// row * 2 + column) instead of writing y and relu(y). Backward (M = N H W; dy = the
// pooled gradient at each window's maximum where y > 0, zero elsewhere):
//   d_beta = sum dy,  d_gamma = sum dy xhat        (over the pooled positions only)
//   d_c = k (dy - d_beta / M - xhat d_gamma / M)
//       = a + b c everywhere, plus k dy at the window maxima,
//   with b = -k rstd d_gamma / M and a = -k d_beta / M - b mean: one dense pass
// reading c and writing d_c. Parallel over channels (deterministic).
//
// CPU kernels. Each channel is one parallel task: the forward reads its N planes twice
// (statistics, then the pool over the planes' windows split by position), the
// backward reads the pooled gradient once for the sums and c once for the dense d_c.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "simd_clones.h"
#include "window_pool.h"

namespace fastmeta {
namespace {

struct Shape {
  int64_t N, C, H, W, Ho, Wo;
};

// c [N, C, H, W] (H, W >= 2), gamma and beta [C]: contiguous, floating, of one dtype
// (their device is checked by the caller, with its other arguments).
Shape check_and_measure(const char* op, const at::Tensor& c, const at::Tensor& gamma,
                        const at::Tensor& beta) {
  check_tensor(op, "c", c, 4, kFloating);
  check_tensor(op, "gamma", gamma, 1, kFloating);
  check_tensor(op, "beta", beta, 1, kFloating);
  check_same_dtype(op, {{"c", c}, {"gamma", gamma}, {"beta", beta}});
  TORCH_CHECK(c.size(2) >= 2 && c.size(3) >= 2, op,
              ": c must be [N, C, H, W] with H, W >= 2 for the 2x2 pool, got ", describe(c));
  check_size(op, "gamma", gamma, 0, c.size(1), "C of c");
  check_size(op, "beta", beta, 0, c.size(1), "C of c");
  return {c.size(0), c.size(1), c.size(2), c.size(3), c.size(2) / 2, c.size(3) / 2};
}

// Flat offset in the plane of window (u, v)'s position `where` (row * 2 + column).
FASTMETA_INLINE int64_t window_offset(const Shape& s, int64_t u, int64_t v, int64_t where) {
  return (2 * u + where / 2) * s.W + 2 * v + where % 2;
}

// One channel's mean and rstd over its N planes (sums of c - c[0] in double per plane,
// so that an offset channel does not cancel).
template <typename scalar_t>
FASTMETA_SIMD_CLONES std::pair<double, double> channel_statistics(const Shape& s, const scalar_t* c,
                                                                  int64_t ch, double eps) {
  const int64_t plane = s.H * s.W;
  const scalar_t ref = c[ch * plane];
  double sum = 0, sumsq = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* p = c + (n * s.C + ch) * plane;
    scalar_t s1 = 0, s2 = 0;
    _Pragma("omp simd reduction(+ : s1, s2)")
    for (int64_t i = 0; i < plane; ++i) {
      const scalar_t d = p[i] - ref;
      s1 += d;
      s2 += d * d;
    }
    sum += s1;
    sumsq += s2;
  }
  const double count = double(s.N * plane), mean_shifted = sum / count;
  const double var = std::max(sumsq / count - mean_shifted * mean_shifted, 0.0);
  return {double(ref) + mean_shifted, 1.0 / std::sqrt(var + eps)};
}

// One channel's pool: each plane's windows split into four window-position planes
// [4][Ho * Wo] (planes scratch, c_max too), then the first maximum of
// relu(bn(c)) over each window and where it is (window_pool.h).
template <typename scalar_t>
FASTMETA_SIMD_CLONES void channel_pool(const Shape& s, const scalar_t* c, int64_t ch,
                                       const BatchNormAffine<scalar_t> bn, scalar_t* planes,
                                       scalar_t* c_max, scalar_t* out, uint8_t* window) {
  const int64_t pooled = s.Ho * s.Wo;
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* p = c + (n * s.C + ch) * s.H * s.W;
    for (int64_t ab = 0; ab < 4; ++ab) {
      for (int64_t u = 0; u < s.Ho; ++u) {
        const scalar_t* row = p + window_offset(s, u, 0, ab);
        scalar_t* P = planes + ab * pooled + u * s.Wo;
        for (int64_t v = 0; v < s.Wo; ++v) P[v] = row[2 * v];
      }
    }
    const int64_t first = (n * s.C + ch) * pooled;
    pool_windows(planes, pooled, bn, out + first, window + first, c_max);
  }
}

// One channel's backward: the sums over the window maxima where relu is open, then
// d_c = a + b c everywhere plus k dy at those maxima. Returns false if a window value
// is not a position 0..3 (never so from the forward; such windows are skipped).
template <typename scalar_t>
FASTMETA_SIMD_CLONES bool channel_backward(const Shape& s, const scalar_t* go, const scalar_t* c,
                                           int64_t ch, scalar_t mean, scalar_t rstd, scalar_t gamma,
                                           scalar_t beta, const uint8_t* window, scalar_t* dc,
                                           scalar_t* d_gamma, scalar_t* d_beta) {
  const int64_t plane = s.H * s.W, pooled = s.Ho * s.Wo;
  const BatchNormAffine<scalar_t> bn(mean, rstd, gamma, beta);
  double sum_dy = 0, sum_dy_xhat = 0;
  bool windows_valid = true;
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* p = c + (n * s.C + ch) * plane;
    const int64_t first = (n * s.C + ch) * pooled;
    for (int64_t u = 0; u < s.Ho; ++u) {
      for (int64_t v = 0; v < s.Wo; ++v) {
        const int64_t o = first + u * s.Wo + v;
        if (window[o] > 3) {
          windows_valid = false;
          continue;
        }
        const scalar_t cv = p[window_offset(s, u, v, window[o])];
        if (bn(cv) > 0) {
          sum_dy += go[o];
          sum_dy_xhat += double(go[o]) * double((cv - mean) * rstd);
        }
      }
    }
  }
  // d_gamma = sum over every position of dy xhat, dy = 0 where relu is closed: a
  // non-finite xhat anywhere (a non-finite mean or rstd) makes it NaN, as 0 * inf does.
  if (!std::isfinite(double(mean)) || !std::isfinite(double(rstd))) sum_dy_xhat = NAN;
  const double count = double(s.N * plane), k = double(gamma) * double(rstd);
  const double b = -k * double(rstd) * sum_dy_xhat / count;
  const scalar_t a_s = scalar_t(-k * sum_dy / count - b * double(mean)), b_s = scalar_t(b);
  const scalar_t k_s = scalar_t(k);
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* p = c + (n * s.C + ch) * plane;
    scalar_t* d = dc + (n * s.C + ch) * plane;
    _Pragma("omp simd")
    for (int64_t i = 0; i < plane; ++i) d[i] = a_s + b_s * p[i];
    const int64_t first = (n * s.C + ch) * pooled;
    for (int64_t u = 0; u < s.Ho; ++u) {
      for (int64_t v = 0; v < s.Wo; ++v) {
        const int64_t o = first + u * s.Wo + v;
        if (window[o] > 3) continue;
        const int64_t at = window_offset(s, u, v, window[o]);
        if (bn(p[at]) > 0) d[at] += k_s * go[o];
      }
    }
  }
  *d_gamma = scalar_t(sum_dy_xhat);
  *d_beta = scalar_t(sum_dy);
  return windows_valid;
}

}  // namespace

// (out [N, C, H/2, W/2], mean [C], rstd [C], window [N, C, H/2, W/2] uint8).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward_cpu(
    const at::Tensor& c, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const char* op = "bn_relu_pool_forward";
  const Shape s = check_and_measure(op, c, gamma, beta);
  check_same_device(op, c10::kCPU, {{"c", c}, {"gamma", gamma}, {"beta", beta}});
  at::Tensor out = at::empty({s.N, s.C, s.Ho, s.Wo}, c.options());
  at::Tensor window = at::empty({s.N, s.C, s.Ho, s.Wo}, c.options().dtype(at::kByte));
  at::Tensor mean = at::empty({s.C}, c.options());
  at::Tensor rstd = at::empty({s.C}, c.options());
  if (s.N == 0) {  // an empty batch has no statistics: NaN, as var_mean of nothing
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {out, mean, rstd, window};
  }
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "bn_relu_pool_forward_cpu", [&] {
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rp = rstd.mutable_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* wp = window.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> planes(4 * s.Ho * s.Wo), c_max(s.Ho * s.Wo);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const auto [mu, r] = channel_statistics(s, cp, ch, eps);
        mp[ch] = scalar_t(mu);
        rp[ch] = scalar_t(r);
        const BatchNormAffine<scalar_t> bn(mp[ch], rp[ch], gp[ch], bp[ch]);
        channel_pool(s, cp, ch, bn, planes.data(), c_max.data(), op, wp);
      }
    });
  });
  return {out, mean, rstd, window};
}

// (d_c [N, C, H, W], d_gamma [C], d_beta [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& c, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& window) {
  const char* op = "bn_relu_pool_backward";
  const Shape s = check_and_measure(op, c, gamma, beta);
  check_tensor(op, "grad_out", grad_out, 4, kFloating);
  check_tensor(op, "mean", mean, 1, kFloating);
  check_tensor(op, "rstd", rstd, 1, kFloating);
  check_tensor(op, "window", window, 4, kUint8);
  check_same_dtype(op, {{"c", c}, {"grad_out", grad_out}, {"mean", mean}, {"rstd", rstd}});
  const at::IntArrayRef pooled = grad_out.sizes();
  check_shape(op, "grad_out", grad_out, {s.N, s.C, s.Ho, s.Wo}, "[N, C, H / 2, W / 2] for c");
  check_shape(op, "window", window, pooled, "like grad_out");
  check_size(op, "mean", mean, 0, s.C, "C of c");
  check_size(op, "rstd", rstd, 0, s.C, "C of c");
  check_same_device(op, c10::kCPU,
                    {{"c", c},
                     {"gamma", gamma},
                     {"beta", beta},
                     {"grad_out", grad_out},
                     {"mean", mean},
                     {"rstd", rstd},
                     {"window", window}});
  at::Tensor d_c = at::empty_like(c);
  at::Tensor d_gamma = at::empty_like(gamma);
  at::Tensor d_beta = at::empty_like(beta);
  if (s.N == 0) return {d_c, d_gamma.zero_(), d_beta.zero_()};  // sums over no example
  std::vector<uint8_t> windows_valid(s.C);  // per channel (a vector<bool> is not thread-safe)
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "bn_relu_pool_backward_cpu", [&] {
    const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
    const scalar_t* bp = beta.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* rp = rstd.const_data_ptr<scalar_t>();
    at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        windows_valid[ch] = channel_backward(
            s, grad_out.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), ch, mp[ch],
            rp[ch], gp[ch], bp[ch], window.const_data_ptr<uint8_t>(),
            d_c.mutable_data_ptr<scalar_t>(), d_gamma.mutable_data_ptr<scalar_t>() + ch,
            d_beta.mutable_data_ptr<scalar_t>() + ch);
      }
    });
  });
  for (int64_t ch = 0; ch < s.C; ++ch) {
    TORCH_CHECK(windows_valid[ch], op, ": window holds a value outside 0..3 in channel ", ch,
                " (not the forward's window)");
  }
  return {d_c, d_gamma, d_beta};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def(
      "bn_relu_pool_forward(Tensor c, Tensor gamma, Tensor beta, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool_backward(Tensor grad_out, Tensor c, Tensor gamma, Tensor beta, "
      "Tensor mean, Tensor rstd, Tensor window) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("bn_relu_pool_forward", &bn_relu_pool_forward_cpu);
  m.impl("bn_relu_pool_backward", &bn_relu_pool_backward_cpu);
}

}  // namespace fastmeta
