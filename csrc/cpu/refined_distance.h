// The squared Euclidean distance of one (query, prototype) pair from the GEMM's q . c
// and the squared norms, as squared_distances and the euclidean prototypical
// cross-entropy compute it: a + b - 2 dot, recomputed directly as sum_j (q_j - c_j)^2
// where that cancels (protonet.h's kRefine: nearly identical points), in double, so
// identical points give exactly 0 and no entry is negative.
#pragma once

#include <cstdint>

#include "../protonet.h"
#include "simd_clones.h"

namespace fastmeta {

template <typename scalar_t>
FASTMETA_INLINE double refined_squared_distance(double dot, double qn, double cn, const scalar_t* q,
                                                const scalar_t* c, int64_t D) {
  const double scale = qn + cn;
  double value = scale - 2.0 * dot;
  if (value <= kRefine<scalar_t> * scale) {  // cancellation: recompute directly
    value = 0;
    for (int64_t j = 0; j < D; ++j) {
      const double diff = double(q[j]) - double(c[j]);
      value += diff * diff;
    }
  }
  return value;
}

}  // namespace fastmeta
