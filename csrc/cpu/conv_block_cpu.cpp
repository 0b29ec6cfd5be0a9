// A conv4 block in one op: Conv2d (stride 1) -> BatchNorm2d with batch statistics
// -> ReLU -> MaxPool2d(2), for convolutions with few input taps (Cin*KH*KW small,
// e.g. a network's first layer on 1- or 3-channel images), where ATen's convolution
// and the three memory-bound passes over the full-resolution activation dominate.
//
// Shapes: x [N, Cin, H, W], weight [C, Cin, KH, KW], bias/gamma/beta [C];
// conv output c [N, C, Hc, Wc] with Hc = H + 2 ph - KH + 1 (never stored: each
// kernel recomputes the part of c it needs), out [N, C, Hc/2, Wc/2].
//   mean_c, rstd_c = batch statistics of c over (N, Hc, Wc) (biased variance), from
//   the mean pbar [taps] and covariance Sigma [taps, taps] of the input patches:
//   mean_c = bias_c + w_c . pbar,  var_c = w_c^T Sigma w_c
//   y = (c - mean) * rstd * gamma + beta,   out = maxpool2(relu(y))
// Backward (M = N*Hc*Wc per channel; dy = the pooled gradient routed to each
// window's first maximum, times [y > 0]; xhat = (c - mean) * rstd):
//   d_beta = sum dy,  d_gamma = sum dy * xhat
//   d_c = gamma * rstd * (dy - d_beta / M - xhat * d_gamma / M)
//   d_weight[c, ci, i, j] = sum_n,h,w d_c[n, c, h, w] x[n, ci, h + i - ph, w + j - pw]
//   d_bias = sum d_c,  d_x = the transposed convolution of d_c with weight
// Without d_x, dy is nonzero only at each window's maximum, so the forward's record
// of where (window, uint8 offset 0..3 = row * 2 + column) and of c there (c_max)
// gives d_beta, d_gamma and the sparse part of d_weight in one pass over the pooled
// outputs; the dense terms of d_weight need only the same patch moments, shared by all
// channels (M' = N Hc Wc conv positions):
//   sum_hw x_tap = M' pbar[tap],  sum_hw xhat x_tap = M' rstd (Sigma w)[tap].
// The forward is parallel over images (statistics first, so nothing is reduced across
// threads), the parameter gradients over channels within chunks of images, d_x over
// images: all deterministic.
//
// CPU kernels. The batch statistics come first, from the mean and covariance of the
// input patches (shared by every channel: mean_c = b + w.pbar, var_c = w^T Sigma w),
// so the forward is one pass over images: each image's padded input is split into
// its four 2x2 phases, which turns every (window position, tap) pair into one
// contiguous run, and each channel's four window-position planes are computed,
// normalized and pooled in L1 (never [N, C, Hc, Wc]), recording each window's argmax
// and conv value there. The backward without d_x needs only those and the same patch
// moments; with d_x it recomputes the planes (the BN sums, then d_c and d_weight) and
// keeps d_c for the transposed convolution.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "simd_clones.h"
#include "window_pool.h"

namespace fastmeta {
namespace {

struct Geometry {
  int64_t N, Cin, H, W, C, KH, KW, ph, pw, Hc, Wc, Ho, Wo;
};

constexpr int64_t kMaxPadding = int64_t(1) << 20;  // keeps H + 2 pad far from overflow

// x [N, Cin, H, W], weight [C, Cin, KH, KW], bias, gamma, beta [C]: contiguous, floating,
// of one dtype (their device is checked by the caller, with its other arguments);
// Cin, H, W, KH, KW >= 1 (a convolution with input taps; the backward's image chunks
// divide by the taps' size) and a conv output of at least 2x2.
Geometry check_and_measure(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                           int64_t ph, int64_t pw) {
  check_tensor(op, "x", x, 4, kFloating);
  check_tensor(op, "weight", weight, 4, kFloating);
  check_tensor(op, "bias", bias, 1, kFloating);
  check_tensor(op, "gamma", gamma, 1, kFloating);
  check_tensor(op, "beta", beta, 1, kFloating);
  check_same_dtype(
      op, {{"x", x}, {"weight", weight}, {"bias", bias}, {"gamma", gamma}, {"beta", beta}});
  const int64_t C = weight.size(0);
  check_size(op, "weight", weight, 1, x.size(1), "Cin of x");
  check_size(op, "bias", bias, 0, C, "C of weight");
  check_size(op, "gamma", gamma, 0, C, "C of weight");
  check_size(op, "beta", beta, 0, C, "C of weight");
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1 && weight.size(2) >= 1 &&
                  weight.size(3) >= 1,
              op, ": x's Cin, H, W and weight's KH, KW must be >= 1, got x ", describe(x),
              " and weight ", describe(weight));
  TORCH_CHECK(0 <= ph && ph <= kMaxPadding && 0 <= pw && pw <= kMaxPadding, op,
              ": pad_h and pad_w must be in [0, ", kMaxPadding, "], got ", ph, " and ", pw);
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), C, weight.size(2), weight.size(3), ph, pw};
  g.Hc = g.H + 2 * ph - g.KH + 1;
  g.Wc = g.W + 2 * pw - g.KW + 1;
  TORCH_CHECK(g.Hc >= 2 && g.Wc >= 2, op, ": the convolution output must be at least 2x2, got ",
              g.Hc, "x", g.Wc, " for x ", describe(x), ", weight ", describe(weight),
              " and padding ", ph, ", ", pw);
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

// Mean pbar [taps] and covariance Sigma [taps, taps] of the input patches over images
// and conv positions (count of them), shared by every channel. Each tap is shifted by
// its input channel's pixel mean first, so that Sigma = E[p p^T] - pbar pbar^T does not
// cancel on offset data (images in [0, 1]). Per image: the taps' rows over the conv
// positions, their sums and pairwise dot products (scalar_t, vectorized), kept in double
// per image and summed over images in order (the result does not depend on threads).
struct PatchMoments {
  double count;
  std::vector<double> mean, cov;

  // The batch mean of a channel's conv output: bias + w . pbar.
  template <typename scalar_t>
  double conv_mean(const scalar_t* w, scalar_t bias) const {
    double mu = bias;
    for (size_t t = 0; t < mean.size(); ++t) mu += double(w[t]) * mean[t];
    return mu;
  }

  // (Sigma w)[t]: the covariance of tap t with a channel's conv output.
  template <typename scalar_t>
  double cov_times(const scalar_t* w, size_t t) const {
    const size_t taps = mean.size();
    double sum = 0;
    for (size_t u = 0; u < taps; ++u) sum += cov[t * taps + u] * double(w[u]);
    return sum;
  }
};

template <typename scalar_t>
FASTMETA_SIMD_CLONES void image_patch_moments(const Geometry& g, const scalar_t* xn,
                                              const double* shift, scalar_t* rows,
                                              double* moments) {
  const int64_t taps = g.Cin * g.KH * g.KW, plane = g.Hc * g.Wc;
  for (int64_t ci = 0, t = 0; ci < g.Cin; ++ci) {
    const scalar_t s = scalar_t(shift[ci]);
    for (int64_t i = 0; i < g.KH; ++i) {
      for (int64_t j = 0; j < g.KW; ++j, ++t) {
        scalar_t* row = rows + t * plane;
        for (int64_t oh = 0; oh < g.Hc; ++oh) {
          const int64_t h = oh + i - g.ph;
          for (int64_t ow = 0; ow < g.Wc; ++ow) {
            const int64_t w = ow + j - g.pw;
            const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
            row[oh * g.Wc + ow] = (inside ? xn[(ci * g.H + h) * g.W + w] : scalar_t(0)) - s;
          }
        }
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    const scalar_t* rt = rows + t * plane;
    scalar_t sum = 0;
    _Pragma("omp simd reduction(+ : sum)")
    for (int64_t k = 0; k < plane; ++k) sum += rt[k];
    moments[t] = sum;
    for (int64_t u = 0; u <= t; ++u) {
      const scalar_t* ru = rows + u * plane;
      scalar_t dot = 0;
      _Pragma("omp simd reduction(+ : dot)")
      for (int64_t k = 0; k < plane; ++k) dot += rt[k] * ru[k];
      moments[taps + t * taps + u] = moments[taps + u * taps + t] = dot;
    }
  }
}

template <typename scalar_t>
PatchMoments patch_moments(const Geometry& g, const scalar_t* xp) {
  const int64_t taps = g.Cin * g.KH * g.KW, plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W;
  std::vector<double> shift(g.Cin, 0.0);
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    for (int64_t n = 0; n < g.N; ++n) {
      const scalar_t* xc = xp + n * in_image + ci * g.H * g.W;
      shift[ci] += std::accumulate(xc, xc + g.H * g.W, 0.0);
    }
    shift[ci] /= double(g.N * g.H * g.W);
  }
  const int64_t per_image = taps + taps * taps;  // sums, then the Gram matrix
  std::vector<double> moments(g.N * per_image);
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<scalar_t> rows(taps * plane);
    for (int64_t n = n0; n < n1; ++n) {
      image_patch_moments(g, xp + n * in_image, shift.data(), rows.data(),
                          moments.data() + n * per_image);
    }
  });
  std::vector<double> total(per_image, 0.0);
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t e = 0; e < per_image; ++e) total[e] += moments[n * per_image + e];
  }
  PatchMoments m{double(g.N * plane), std::vector<double>(taps), std::vector<double>(taps * taps)};
  const double* s = total.data();
  const double* gram = total.data() + taps;
  for (int64_t t = 0; t < taps; ++t) m.mean[t] = s[t] / m.count + shift[t / (g.KH * g.KW)];
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t u = 0; u < taps; ++u) {
      m.cov[t * taps + u] = gram[t * taps + u] / m.count - (s[t] / m.count) * (s[u] / m.count);
    }
  }
  return m;
}

// The padded input of an image split into its four 2x2 phases, so that each window
// position (a, b) of the pool reads each tap t = (ci, i, j) as one contiguous run:
//   X[ci][p][q][u S + v] = x_padded[ci][2u + p][2v + q]       (zero outside x)
//   c[2u + a][2v + b] = bias + sum_t w[t] X[ci][(a + i) % 2][(b + j) % 2][k + d]
// for the flat index k = u S + v and d = ((a + i) / 2) S + (b + j) / 2. Rows u < Ho,
// columns v < S = Wo + KW / 2 (the columns v >= Wo are computed and thrown away, and
// they read at most one row past the last one used: R = Ho + KH / 2 + 1 rows).
struct Phases {
  int64_t S, R, per_image, runs;  // runs = Ho * S, the length of each flat run
  std::vector<int64_t> offset;    // [4 window positions][taps]: start of each run in X
};

Phases make_phases(const Geometry& g) {
  const int64_t taps = g.Cin * g.KH * g.KW;
  Phases ph{g.Wo + g.KW / 2, g.Ho + g.KH / 2 + 1, 0, 0, std::vector<int64_t>(4 * taps)};
  ph.per_image = g.Cin * 4 * ph.R * ph.S;
  ph.runs = g.Ho * ph.S;
  for (int64_t ab = 0; ab < 4; ++ab) {
    const int64_t a = ab / 2, b = ab % 2;
    for (int64_t ci = 0, t = 0; ci < g.Cin; ++ci) {
      for (int64_t i = 0; i < g.KH; ++i) {
        for (int64_t j = 0; j < g.KW; ++j, ++t) {
          const int64_t phase = (ci * 2 + (a + i) % 2) * 2 + (b + j) % 2;
          ph.offset[ab * taps + t] = phase * ph.R * ph.S + (a + i) / 2 * ph.S + (b + j) / 2;
        }
      }
    }
  }
  return ph;
}

// X [N, per_image] for all images (about the size of x).
template <typename scalar_t>
at::Tensor split_phases(const Geometry& g, const Phases& ph, const at::Tensor& x) {
  at::Tensor phases = at::empty({g.N, ph.per_image}, x.options());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* out = phases.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.Cin * 4, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {  // p = (n, ci, row phase, column phase)
      const int64_t n = p / (4 * g.Cin), ci = p / 4 % g.Cin, dr = p / 2 % 2, ds = p % 2;
      const scalar_t* xc = xp + (n * g.Cin + ci) * g.H * g.W;
      scalar_t* X = out + p * ph.R * ph.S;
      for (int64_t u = 0; u < ph.R; ++u) {
        const int64_t h = 2 * u + dr - g.ph;
        for (int64_t v = 0; v < ph.S; ++v) {
          const int64_t w = 2 * v + ds - g.pw;
          X[u * ph.S + v] = h >= 0 && h < g.H && w >= 0 && w < g.W ? xc[h * g.W + w] : 0;
        }
      }
    }
  });
  return phases;
}

// planes[ab][k] = bias + sum_t w[t] X[offset[ab][t] + k], k < runs: the conv at the
// four positions of every pooling window of one image and channel.
template <typename scalar_t>
FASTMETA_INLINE void window_planes(const Phases& ph, int64_t taps, const scalar_t* X,
                                   const scalar_t* w, scalar_t bias, scalar_t* planes) {
  for (int64_t ab = 0; ab < 4; ++ab) {
    scalar_t* P = planes + ab * ph.runs;
    std::fill(P, P + ph.runs, bias);
    for (int64_t t = 0; t < taps; ++t) {
      const scalar_t* src = X + ph.offset[ab * taps + t];
      const scalar_t wv = w[t];
      _Pragma("omp simd")
      for (int64_t k = 0; k < ph.runs; ++k) P[k] += wv * src[k];
    }
  }
}

// Scatters pooled gradients d[k] into the four window-position planes:
// planes[ab * runs + k] = d[k] where window[k] == ab, else 0 (k < runs).
template <typename scalar_t>
FASTMETA_INLINE void scatter_windows(const scalar_t* d, const uint8_t* window, int64_t runs,
                                     scalar_t* planes) {
  _Pragma("omp simd")
  for (int64_t k = 0; k < runs; ++k) {  // selects, not branches, so that it vectorizes
    const int32_t where = window[k];
    const scalar_t dv = d[k], zero = 0;
    planes[k] = where == 0 ? dv : zero;
    planes[runs + k] = where == 1 ? dv : zero;
    planes[2 * runs + k] = where == 2 ? dv : zero;
    planes[3 * runs + k] = where == 3 ? dv : zero;
  }
}

// One channel's sparse sums over images [n0, n1), added to sparse[t] += sum dy x_t and
// sums += (sum dy, sum dy xhat). Scratch from the caller: open [Ho * Wo]; open_runs and
// where_runs [runs], the same in the runs' layout (zero at the thrown-away columns);
// dy [4 * runs].
template <typename scalar_t>
FASTMETA_SIMD_CLONES void channel_sparse_sums(
    const Geometry& g, const Phases& ph, const scalar_t* phases, int64_t c, int64_t n0, int64_t n1,
    scalar_t mu, scalar_t r, const BatchNormAffine<scalar_t> bn, const scalar_t* gop,
    const uint8_t* winp, const scalar_t* cmp, scalar_t* open, scalar_t* open_runs,
    uint8_t* where_runs, scalar_t* dy, scalar_t* partial, double* sparse, double* sums) {
  const int64_t taps = g.Cin * g.KH * g.KW, pooled = g.Ho * g.Wo;
  double sum_dy = 0, sum_dy_xhat = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t first = (n * g.C + c) * pooled;
    scalar_t s1 = 0, s2 = 0;
    _Pragma("omp simd reduction(+ : s1, s2)")
    for (int64_t o = 0; o < pooled; ++o) {  // dy at the window maxima where relu is open
      const scalar_t cv = cmp[first + o];
      const scalar_t d = bn(cv) > 0 ? gop[first + o] : scalar_t(0);
      open[o] = d;
      s1 += d;
      s2 += d * ((cv - mu) * r);
    }
    sum_dy += s1;
    sum_dy_xhat += s2;
    for (int64_t u = 0; u < g.Ho; ++u) {
      std::copy_n(open + u * g.Wo, g.Wo, open_runs + u * ph.S);
      std::copy_n(winp + first + u * g.Wo, g.Wo, where_runs + u * ph.S);
    }
    scatter_windows(open_runs, where_runs, ph.runs, dy);
    const scalar_t* X = phases + n * ph.per_image;
    for (int64_t t = 0; t < taps; ++t) {  // per position, reduced once per chunk
      const scalar_t* d = dy;
      const int64_t* off = ph.offset.data() + t;
      const scalar_t *x0 = X + off[0], *x1 = X + off[taps], *x2 = X + off[2 * taps],
                     *x3 = X + off[3 * taps];
      scalar_t* acc = partial + t * ph.runs;
      const int64_t runs = ph.runs;
      _Pragma("omp simd")
      for (int64_t k = 0; k < runs; ++k) {
        acc[k] +=
            d[k] * x0[k] + d[runs + k] * x1[k] + d[2 * runs + k] * x2[k] + d[3 * runs + k] * x3[k];
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    scalar_t* acc = partial + t * ph.runs;
    sparse[t] += std::accumulate(acc, acc + ph.runs, 0.0);
    std::fill(acc, acc + ph.runs, scalar_t(0));
  }
  sums[0] += sum_dy;
  sums[1] += sum_dy_xhat;
}

// Images per pass of the backward: their phases stay in L2 while every channel reads them.
constexpr int64_t kPhaseChunkBytes = 256 << 10;

template <typename scalar_t>
void conv_block_parameter_grads(const Geometry& g, const Phases& ph, const scalar_t* phases,
                                const PatchMoments& moments, const scalar_t* gop,
                                const scalar_t* wp, const scalar_t* bp, const scalar_t* gp,
                                const scalar_t* betap, const scalar_t* mp, const scalar_t* rp,
                                const uint8_t* winp, const scalar_t* cmp, scalar_t* dwp,
                                scalar_t* dbp, scalar_t* dgp, scalar_t* dbetap) {
  const int64_t taps = g.Cin * g.KH * g.KW;
  std::vector<double> sparse(g.C * taps, 0.0), sums(g.C * 2, 0.0);
  const int64_t chunk =
      std::max<int64_t>(1, kPhaseChunkBytes / (ph.per_image * int64_t(sizeof(scalar_t))));
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {  // channels in parallel within a chunk
    const int64_t n1 = std::min(g.N, n0 + chunk);
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> dy(4 * ph.runs), open(g.Ho * g.Wo), open_runs(ph.runs, 0),
          partial(taps * ph.runs, 0);
      std::vector<uint8_t> where_runs(ph.runs, 0);
      for (int64_t c = c0; c < c1; ++c) {
        const BatchNormAffine<scalar_t> bn(mp[c], rp[c], gp[c], betap[c]);
        channel_sparse_sums(g, ph, phases, c, n0, n1, mp[c], rp[c], bn, gop, winp, cmp, open.data(),
                            open_runs.data(), where_runs.data(), dy.data(), partial.data(),
                            sparse.data() + c * taps, sums.data() + c * 2);
      }
    });
  }
  for (int64_t c = 0; c < g.C; ++c) {
    const double sum_dy = sums[c * 2], sum_dy_xhat = sums[c * 2 + 1];
    const double r = rp[c], k = double(gp[c]) * r;
    const scalar_t* w = wp + c * taps;
    for (int64_t t = 0; t < taps; ++t) {
      dwp[c * taps + t] = scalar_t(k * (sparse[c * taps + t] - sum_dy * moments.mean[t] -
                                        sum_dy_xhat * r * moments.cov_times(w, t)));
    }
    dbp[c] = scalar_t(-k * sum_dy_xhat * r * (moments.conv_mean(w, bp[c]) - double(mp[c])));
    dgp[c] = scalar_t(sum_dy_xhat);
    dbetap[c] = scalar_t(sum_dy);
  }
}

// The forward of images [n0, n1), all channels: the four window-position planes, then
// the pool into out / window / c_max [N, C, Ho, Wo]. planes [4 * runs], best, where,
// best_c [runs] are the caller's scratch.
template <typename scalar_t>
FASTMETA_SIMD_CLONES void images_forward(const Geometry& g, const Phases& ph,
                                         const scalar_t* phases, const scalar_t* wp,
                                         const scalar_t* bp, const BatchNormAffine<scalar_t>* bn,
                                         int64_t n0, int64_t n1, scalar_t* planes, scalar_t* best,
                                         uint8_t* where, scalar_t* best_c, scalar_t* op,
                                         uint8_t* winp, scalar_t* cmp) {
  const int64_t taps = g.Cin * g.KH * g.KW, pooled = g.Ho * g.Wo;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      window_planes(ph, taps, phases + n * ph.per_image, wp + c * taps, bp[c], planes);
      pool_windows(planes, ph.runs, bn[c], best, where, best_c);
      const int64_t first = (n * g.C + c) * pooled;
      for (int64_t u = 0; u < g.Ho; ++u) {  // drop the thrown-away columns
        std::copy_n(best + u * ph.S, g.Wo, op + first + u * g.Wo);
        std::copy_n(where + u * ph.S, g.Wo, winp + first + u * g.Wo);
        std::copy_n(best_c + u * ph.S, g.Wo, cmp + first + u * g.Wo);
      }
    }
  }
}

}  // namespace

// (out [N, C, Hc/2, Wc/2], mean [C], rstd [C], window [N, C, Hc/2, Wc/2] uint8,
//  c_max [N, C, Hc/2, Wc/2]).
using ConvBlockForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
ConvBlockForward conv_block_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const at::Tensor& gamma,
                                        const at::Tensor& beta, int64_t pad_h, int64_t pad_w,
                                        double eps) {
  const char* op = "conv_block_forward";
  const Geometry g = check_and_measure(op, x, weight, bias, gamma, beta, pad_h, pad_w);
  check_same_device(
      op, c10::kCPU,
      {{"x", x}, {"weight", weight}, {"bias", bias}, {"gamma", gamma}, {"beta", beta}});
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options());
  at::Tensor mean = at::empty({g.C}, x.options());
  at::Tensor rstd = at::empty({g.C}, x.options());
  at::Tensor window = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().dtype(at::kByte));
  at::Tensor c_max = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options());
  if (g.N == 0) {  // an empty batch has no statistics: NaN, as var_mean of nothing
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {out, mean, rstd, window, c_max};
  }
  const int64_t taps = g.Cin * g.KH * g.KW, pooled = g.Ho * g.Wo;
  const Phases ph = make_phases(g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_forward_cpu", [&] {
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rp = rstd.mutable_data_ptr<scalar_t>();
    // Statistics: mean_c = b_c + w_c . pbar, var_c = w_c^T Sigma w_c.
    const PatchMoments moments = patch_moments(g, x.const_data_ptr<scalar_t>());
    std::vector<BatchNormAffine<scalar_t>> bn;
    bn.reserve(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* w = wp + c * taps;
      double var = 0;  // w^T Sigma w
      for (int64_t t = 0; t < taps; ++t) var += double(w[t]) * moments.cov_times(w, t);
      mp[c] = scalar_t(moments.conv_mean(w, bp[c]));
      rp[c] = scalar_t(1.0 / std::sqrt(std::max(var, 0.0) + eps));
      bn.emplace_back(mp[c], rp[c], gamma.const_data_ptr<scalar_t>()[c],
                      beta.const_data_ptr<scalar_t>()[c]);
    }
    const at::Tensor phases = split_phases<scalar_t>(g, ph, x);
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> planes(4 * ph.runs), best(ph.runs), best_c(ph.runs);
      std::vector<uint8_t> where(ph.runs);
      images_forward(g, ph, phases.const_data_ptr<scalar_t>(), wp, bp, bn.data(), n0, n1,
                     planes.data(), best.data(), where.data(), best_c.data(),
                     out.mutable_data_ptr<scalar_t>(), window.mutable_data_ptr<uint8_t>(),
                     c_max.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, mean, rstd, window, c_max};
}

namespace {

// The tensors every step of the backward reads (checked).
struct BackwardInputs {
  at::Tensor grad_out, x, weight, bias, gamma, beta, mean, rstd;
};

// The parameter gradients the backward fills: d_weight, d_bias, d_gamma, d_beta, shaped
// like the parameters.
struct ParameterGrads {
  at::Tensor weight, bias, gamma, beta;
};

// grad_out [N, C, Ho, Wo], the forward's mean, rstd [C], window [N, C, Ho, Wo] uint8 and
// c_max [N, C, Ho, Wo] (x and the parameters are checked by check_and_measure), and the
// device of all.
void check_backward_inputs(const char* op, const Geometry& g, const BackwardInputs& in,
                           const at::Tensor& window, const at::Tensor& c_max) {
  check_tensor(op, "grad_out", in.grad_out, 4, kFloating);
  check_tensor(op, "mean", in.mean, 1, kFloating);
  check_tensor(op, "rstd", in.rstd, 1, kFloating);
  check_tensor(op, "window", window, 4, kUint8);
  check_tensor(op, "c_max", c_max, 4, kFloating);
  check_same_dtype(op, {{"x", in.x},
                        {"grad_out", in.grad_out},
                        {"mean", in.mean},
                        {"rstd", in.rstd},
                        {"c_max", c_max}});
  check_shape(op, "grad_out", in.grad_out, {g.N, g.C, g.Ho, g.Wo}, "[N, C, Hc / 2, Wc / 2]");
  check_shape(op, "window", window, in.grad_out.sizes(), "like grad_out");
  check_shape(op, "c_max", c_max, in.grad_out.sizes(), "like grad_out");
  check_size(op, "mean", in.mean, 0, g.C, "C of weight");
  check_size(op, "rstd", in.rstd, 0, g.C, "C of weight");
  check_same_device(op, c10::kCPU,
                    {{"x", in.x},
                     {"weight", in.weight},
                     {"bias", in.bias},
                     {"gamma", in.gamma},
                     {"beta", in.beta},
                     {"grad_out", in.grad_out},
                     {"mean", in.mean},
                     {"rstd", in.rstd},
                     {"window", window},
                     {"c_max", c_max}});
}

// Without d_x: d_weight, d_bias, d_gamma, d_beta from the forward's record of each
// window's maximum (window uint8 and c_max [N, C, Ho, Wo]) and the patch moments, by
// conv_block_parameter_grads (the sparse sums over the pooled outputs plus the dense
// terms sum_hw x_tap = M' pbar, sum_hw xhat x_tap = M' rstd (Sigma w)).
void sparse_parameter_grads(const Geometry& g, const BackwardInputs& in, const at::Tensor& window,
                            const at::Tensor& c_max, const ParameterGrads& grads) {
  const Phases ph = make_phases(g);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "conv_block_parameter_grads_cpu", [&] {
    const at::Tensor phases = split_phases<scalar_t>(g, ph, in.x);
    conv_block_parameter_grads(
        g, ph, phases.const_data_ptr<scalar_t>(), patch_moments(g, in.x.const_data_ptr<scalar_t>()),
        in.grad_out.const_data_ptr<scalar_t>(), in.weight.const_data_ptr<scalar_t>(),
        in.bias.const_data_ptr<scalar_t>(), in.gamma.const_data_ptr<scalar_t>(),
        in.beta.const_data_ptr<scalar_t>(), in.mean.const_data_ptr<scalar_t>(),
        in.rstd.const_data_ptr<scalar_t>(), window.const_data_ptr<uint8_t>(),
        c_max.const_data_ptr<scalar_t>(), grads.weight.mutable_data_ptr<scalar_t>(),
        grads.bias.mutable_data_ptr<scalar_t>(), grads.gamma.mutable_data_ptr<scalar_t>(),
        grads.beta.mutable_data_ptr<scalar_t>());
  });
}

// What the dense backward reads of one channel: its filter w [taps], its bias, the
// forward's mean and rstd, gamma, and the forward's batch norm y = bn(c).
template <typename scalar_t>
struct Channel {
  const scalar_t* w;
  scalar_t bias, mean, rstd, gamma;
  BatchNormAffine<scalar_t> bn;
};

// One image's planes of one channel, [Hc, Wc] each (a thread's scratch).
template <typename scalar_t>
struct ChannelPlanes {
  std::vector<scalar_t> xhat, y, dy;
  explicit ChannelPlanes(int64_t plane) : xhat(plane), y(plane), dy(plane) {}
};

// Routes the pooled gradient of one image and channel, go [Ho, Wo], to the conv plane.
// Recomputes c = conv(x_n, w) + bias [Hc, Wc] (x_n [Cin, H, W]) and from it
//   y = bn(c),  xhat = (c - mean) * rstd                                   [Hc, Wc]
// then dy [Hc, Wc] = go[oh, ow] at window (oh, ow)'s first maximum of relu(y) when
// y > 0 there, zero elsewhere.
template <typename scalar_t>
FASTMETA_INLINE void route_pooled_grad(const Geometry& g, const Channel<scalar_t>& ch,
                                       const scalar_t* xn, const scalar_t* go,
                                       ChannelPlanes<scalar_t>& p) {
  const int64_t plane = g.Hc * g.Wc;
  // Locals, not ch's fields, in the loops: the stores to y and xhat could alias those.
  const BatchNormAffine<scalar_t> bn = ch.bn;
  const scalar_t mu = ch.mean, r = ch.rstd;
  scalar_t* xhat = p.xhat.data();
  scalar_t* y = p.y.data();
  scalar_t* dy = p.dy.data();
  conv_plane(g, xn, ch.w, ch.bias, xhat);
  for (int64_t k = 0; k < plane; ++k) {
    y[k] = bn(xhat[k]);
    xhat[k] = (xhat[k] - mu) * r;
  }
  std::fill(dy, dy + plane, scalar_t(0));
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      scalar_t max_val;
      const int64_t best = window_argmax(g, y, oh, ow, &max_val);
      if (y[best] > 0) dy[best] += go[oh * g.Wo + ow];
    }
  }
}

// Channel c's batch-norm sums over all images (pass 1 of the dense backward):
//   (d_beta, d_gamma) = (sum dy, sum dy * xhat)   over (N, Hc, Wc)
// each image's plane summed in scalar_t (vectorized), the images in double, in order.
template <typename scalar_t>
FASTMETA_INLINE std::pair<double, double> channel_bn_sums(const Geometry& g, int64_t c,
                                                          const Channel<scalar_t>& ch,
                                                          const scalar_t* xp, const scalar_t* gop,
                                                          ChannelPlanes<scalar_t>& p) {
  const int64_t plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W;
  const scalar_t* dy = p.dy.data();
  const scalar_t* xhat = p.xhat.data();
  double sum_dy = 0, sum_dy_xhat = 0;
  for (int64_t n = 0; n < g.N; ++n) {
    route_pooled_grad(g, ch, xp + n * in_image, gop + (n * g.C + c) * g.Ho * g.Wo, p);
    scalar_t s1 = 0, s2 = 0;
    _Pragma("omp simd reduction(+ : s1, s2)")
    for (int64_t k = 0; k < plane; ++k) {
      s1 += dy[k];
      s2 += dy[k] * xhat[k];
    }
    sum_dy += s1;
    sum_dy_xhat += s2;
  }
  return {sum_dy, sum_dy_xhat};
}

// One image's d_c [Hc, Wc] of a channel, from its dy and xhat [Hc, Wc] and the
// channel's means over the batch (M = N Hc Wc):
//   d_c = k_scale * (dy - mean_dy - xhat * mean_dy_xhat),  k_scale = gamma * rstd,
//   mean_dy = d_beta / M,  mean_dy_xhat = d_gamma / M;
// returns the image's sum of d_c (its share of d_bias), in scalar_t (vectorized).
template <typename scalar_t>
FASTMETA_INLINE scalar_t image_d_c(int64_t plane, scalar_t k_scale, scalar_t mean_dy,
                                   scalar_t mean_dy_xhat, const ChannelPlanes<scalar_t>& p,
                                   scalar_t* dc) {
  const scalar_t* dy = p.dy.data();
  const scalar_t* xhat = p.xhat.data();
  scalar_t s1 = 0;
  _Pragma("omp simd reduction(+ : s1)")
  for (int64_t k = 0; k < plane; ++k) {
    dc[k] = k_scale * (dy[k] - mean_dy - xhat[k] * mean_dy_xhat);
    s1 += dc[k];
  }
  return s1;
}

// Adds one image's share of a channel's d_weight [taps] (in double): for each tap
// t = (ci, i, j),
//   dw[t] += sum_oh,ow d_c[oh, ow] x_n[ci, oh + i - ph, ow + j - pw]   (zero padded)
// with d_c [Hc, Wc] and x_n [Cin, H, W]; each tap's sum in scalar_t (vectorized).
template <typename scalar_t>
FASTMETA_INLINE void add_weight_grad(const Geometry& g, const scalar_t* xn, const scalar_t* dc,
                                     double* dw) {
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

// Channel c's gradients with d_x: d_beta and d_gamma from the batch-norm sums (pass 1),
// then per image (pass 2) d_c, written to dcp [N, C, Hc, Wc] for the transposed
// convolution, d_bias = sum d_c and d_weight [taps] (summed in double, in image
// order). dw [taps] is scratch.
template <typename scalar_t>
FASTMETA_INLINE void channel_dense_grads(const Geometry& g, int64_t c, const Channel<scalar_t>& ch,
                                         const scalar_t* xp, const scalar_t* gop,
                                         ChannelPlanes<scalar_t>& p, std::vector<double>& dw,
                                         scalar_t* dcp, scalar_t* d_weight, scalar_t* d_bias,
                                         scalar_t* d_gamma, scalar_t* d_beta) {
  const int64_t plane = g.Hc * g.Wc, in_image = g.Cin * g.H * g.W;
  const auto [sum_dy, sum_dy_xhat] = channel_bn_sums(g, c, ch, xp, gop, p);
  *d_beta = scalar_t(sum_dy);
  *d_gamma = scalar_t(sum_dy_xhat);
  const double count = double(g.N * plane);
  const scalar_t k_scale = ch.gamma * ch.rstd;
  const scalar_t mean_dy = scalar_t(sum_dy / count);
  const scalar_t mean_dy_xhat = scalar_t(sum_dy_xhat / count);
  std::fill(dw.begin(), dw.end(), 0.0);
  double db = 0;
  for (int64_t n = 0; n < g.N; ++n) {
    route_pooled_grad(g, ch, xp + n * in_image, gop + (n * g.C + c) * g.Ho * g.Wo, p);
    scalar_t* dc = dcp + (n * g.C + c) * plane;
    db += image_d_c(plane, k_scale, mean_dy, mean_dy_xhat, p, dc);
    add_weight_grad(g, xp + n * in_image, dc, dw.data());
  }
  for (size_t t = 0; t < dw.size(); ++t) d_weight[t] = scalar_t(dw[t]);
  *d_bias = scalar_t(db);
}

// With d_x: the parameter gradients, channels in parallel (channel_dense_grads);
// returns d_c [N, C, Hc, Wc], kept for the transposed convolution. The steps are
// FASTMETA_INLINE: compiled into this loop as one function, they run as fast as the
// single function they were split from (called, they cost some 1-2% more).
at::Tensor dense_parameter_grads(const Geometry& g, const BackwardInputs& in,
                                 const ParameterGrads& grads) {
  at::Tensor d_c = at::empty({g.N, g.C, g.Hc, g.Wc}, in.x.options());
  const int64_t plane = g.Hc * g.Wc, taps = g.Cin * g.KH * g.KW;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "conv_block_backward_cpu", [&] {
    const scalar_t* wp = in.weight.const_data_ptr<scalar_t>();
    const scalar_t* bp = in.bias.const_data_ptr<scalar_t>();
    const scalar_t* gp = in.gamma.const_data_ptr<scalar_t>();
    const scalar_t* betap = in.beta.const_data_ptr<scalar_t>();
    const scalar_t* mp = in.mean.const_data_ptr<scalar_t>();
    const scalar_t* rp = in.rstd.const_data_ptr<scalar_t>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* gop = in.grad_out.const_data_ptr<scalar_t>();
    scalar_t* dwp = grads.weight.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = grads.bias.mutable_data_ptr<scalar_t>();
    scalar_t* dgp = grads.gamma.mutable_data_ptr<scalar_t>();
    scalar_t* dbetap = grads.beta.mutable_data_ptr<scalar_t>();
    scalar_t* dcp = d_c.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
      ChannelPlanes<scalar_t> planes(plane);
      std::vector<double> dw(taps);
      for (int64_t c = c0; c < c1; ++c) {
        const BatchNormAffine<scalar_t> bn(mp[c], rp[c], gp[c], betap[c]);
        const Channel<scalar_t> ch{wp + c * taps, bp[c], mp[c], rp[c], gp[c], bn};
        channel_dense_grads(g, c, ch, xp, gop, planes, dw, dcp, dwp + c * taps, dbp + c, dgp + c,
                            dbetap + c);
      }
    });
  });
  return d_c;
}

// One plane of d_x, image n and input channel ci, dx [H, W] (zero on entry): the
// transposed convolution of d_c[n] (dcn [C, Hc, Wc]) with weight [C, Cin, KH, KW],
//   dx[oh + i - ph, ow + j - pw] += weight[c, ci, i, j] d_c[n, c, oh, ow]
// adding c, i, j, oh in order.
template <typename scalar_t>
FASTMETA_INLINE void image_d_x(const Geometry& g, const scalar_t* wp, const scalar_t* dcn,
                               int64_t ci, scalar_t* dx) {
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* dc = dcn + c * g.Hc * g.Wc;
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

// d_x [N, Cin, H, W] by the transposed convolution of d_c [N, C, Hc, Wc] with weight:
//   d_x[n, ci, h, w] = sum_c,i,j weight[c, ci, i, j] d_c[n, c, h - i + ph, w - j + pw]
// parallel over the (n, ci) planes (image_d_x; deterministic).
at::Tensor transposed_conv(const Geometry& g, const at::Tensor& weight, const at::Tensor& d_c,
                           const at::Tensor& x) {
  at::Tensor d_x = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_block_backward_x_cpu", [&] {
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const scalar_t* dcp = d_c.const_data_ptr<scalar_t>();
    scalar_t* dxp = d_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.Cin, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t n = task / g.Cin, ci = task % g.Cin;
        image_d_x(g, wp, dcp + n * g.C * g.Hc * g.Wc, ci, dxp + task * g.H * g.W);
      }
    });
  });
  return d_x;
}

}  // namespace

// Returns (d_x [N, Cin, H, W] or empty, d_weight, d_bias, d_gamma, d_beta); window and
// c_max are the forward's (used when need_x is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& window, const at::Tensor& c_max, int64_t pad_h,
    int64_t pad_w, bool need_x) {
  const char* op = "conv_block_backward";
  const Geometry g = check_and_measure(op, x, weight, bias, gamma, beta, pad_h, pad_w);
  const BackwardInputs in{grad_out, x, weight, bias, gamma, beta, mean, rstd};
  check_backward_inputs(op, g, in, window, c_max);
  const ParameterGrads grads{at::empty_like(weight), at::empty_like(bias), at::empty_like(gamma),
                             at::empty_like(beta)};
  if (g.N == 0) {  // sums over no example
    return {need_x ? at::empty_like(x) : at::empty({0}, x.options()), grads.weight.zero_(),
            grads.bias.zero_(), grads.gamma.zero_(), grads.beta.zero_()};
  }
  if (!need_x) {
    sparse_parameter_grads(g, in, window, c_max, grads);
    return {at::empty({0}, x.options()), grads.weight, grads.bias, grads.gamma, grads.beta};
  }
  const at::Tensor d_c = dense_parameter_grads(g, in, grads);
  return {transposed_conv(g, weight, d_c, x), grads.weight, grads.bias, grads.gamma, grads.beta};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def(
      "conv_block_forward(Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, "
      "int pad_h, int pad_w, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
      "Tensor gamma, Tensor beta, Tensor mean, Tensor rstd, Tensor window, Tensor c_max, "
      "int pad_h, int pad_w, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("conv_block_forward", &conv_block_forward_cpu);
  m.impl("conv_block_backward", &conv_block_backward_cpu);
}

}  // namespace fastmeta
