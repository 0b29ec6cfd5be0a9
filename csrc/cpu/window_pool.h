// Batch norm as one subtract and multiply-add and the 2x2 max pool of relu(y) over window-position
// planes, shared by the fused conv4-block kernels (conv_block, bn_relu_pool).
#pragma once

#include <cstdint>

#include "simd_clones.h"

namespace fastmeta {

// One channel's batch norm y = (c - mean) * scale + beta, scale = rstd * gamma (rounded
// once), from the stored statistics, so that a forward and its backward round y
// identically (the backward's relu test must agree with the forward's). Centred, not
// c * scale + (beta - mean * scale): that form cancels when |mean| is far above the
// spread (a channel of 1e30s gave 0 for beta, or NaN).
template <typename scalar_t>
struct BatchNormAffine {
  scalar_t mean, scale, beta;
  BatchNormAffine(scalar_t mean_, scalar_t rstd, scalar_t gamma, scalar_t beta_)
      : mean(mean_), scale(scalar_t(double(rstd) * double(gamma))), beta(beta_) {}
  FASTMETA_INLINE scalar_t operator()(scalar_t c) const { return (c - mean) * scale + beta; }
};

// Pooling over the four window-position planes P[ab * runs + k], k < runs: the first
// maximum of relu(bn(c)) over each window, scanned row by row as ATen's
// max_pool2d does (a NaN wins), into out[k], where it is (ab) into window[k] and the
// conv value there into c_max[k].
template <typename scalar_t>
FASTMETA_INLINE void pool_windows(const scalar_t* P, int64_t runs,
                                  const BatchNormAffine<scalar_t> bn, scalar_t* out,
                                  uint8_t* window, scalar_t* c_max) {
  const scalar_t zero = 0;
  _Pragma("omp simd")
  for (int64_t k = 0; k < runs; ++k) {
    scalar_t best = 0, best_c = 0;
    int32_t where = 0;
    for (int32_t ab = 0; ab < 4; ++ab) {  // unrolled; written so that it vectorizes
      const scalar_t cv = P[ab * runs + k];
      scalar_t y = bn(cv);
      y = y < zero ? zero : y;
      const bool take = ab == 0 || y > best || y != y;
      best = take ? y : best;
      best_c = take ? cv : best_c;
      where = take ? ab : where;
    }
    out[k] = best;
    window[k] = uint8_t(where);
    c_max[k] = best_c;
  }
}

}  // namespace fastmeta
