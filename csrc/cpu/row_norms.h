// Squared L2 norms of the rows of a contiguous [B, N, D] tensor, accumulated in
// the op-math type: [B, N].
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "parallel_grain.h"

namespace fastmeta {

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_squared_norms(const at::Tensor& x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0) * x.size(1), D = x.size(2);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  std::vector<acc_t> norms(rows);
  at::parallel_for(0, rows, grain_for(D),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = data + r * D;
      acc_t sum = 0;
      for (int64_t j = 0; j < D; ++j) sum += acc_t(row[j]) * acc_t(row[j]);
      norms[r] = sum;
    }
  });
  return norms;
}

}  // namespace fastmeta
