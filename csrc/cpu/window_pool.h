// Batch norm as one multiply-add and the 2x2 max pool of relu(y) over window-position
// planes, shared by the fused conv4-block kernels (conv_block, bn_relu_pool).
#pragma once

#include <cstdint>
#include <utility>

#include "simd_clones.h"

namespace fastmeta {

// y = c * scale + shift with scale = rstd * gamma, shift = beta - mean * scale, from
// the stored statistics, so that a forward and its backward round y identically (the
// backward's relu test must agree with the forward's).
template <typename scalar_t>
std::pair<scalar_t, scalar_t> batch_norm_affine(scalar_t mean, scalar_t rstd, scalar_t gamma,
                                                scalar_t beta) {
  const double scale = double(rstd) * double(gamma);
  return {scalar_t(scale), scalar_t(double(beta) - double(mean) * scale)};
}

// Pooling over the four window-position planes P[ab * runs + k], k < runs: the first
// maximum of relu(c * scale + shift) over each window, scanned row by row as ATen's
// max_pool2d does (a NaN wins), into out[k], where it is (ab) into window[k] and the
// conv value there into c_max[k].
template <typename scalar_t>
FASTMETA_INLINE void pool_windows(const scalar_t* P, int64_t runs, scalar_t scale, scalar_t shift,
                                  scalar_t* out, uint8_t* window, scalar_t* c_max) {
  const scalar_t zero = 0;
  _Pragma("omp simd")
  for (int64_t k = 0; k < runs; ++k) {
    scalar_t best = 0, best_c = 0;
    int32_t where = 0;
    for (int32_t ab = 0; ab < 4; ++ab) {  // unrolled; written so that it vectorizes
      const scalar_t cv = P[ab * runs + k];
      scalar_t y = cv * scale + shift;
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
