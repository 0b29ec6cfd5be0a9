#include "row_norms.h"

#include <ATen/Parallel.h>

#include "parallel_grain.h"
#include "simd_clones.h"

namespace fastmeta {
namespace {

// sum_j row[j]^2 in acc_t, lane-wise partial sums (vectorized; a fixed order per ISA).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES acc_t squared_norm(const scalar_t* row, int64_t D) {
  acc_t sum = 0;
  _Pragma("omp simd reduction(+ : sum)")
  for (int64_t j = 0; j < D; ++j) sum += acc_t(row[j]) * acc_t(row[j]);
  return sum;
}

}  // namespace

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_squared_norms(const at::Tensor& x) {
  const int64_t rows = x.size(0) * x.size(1), D = x.size(2);
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  std::vector<at::opmath_type<scalar_t>> norms(rows);
  at::parallel_for(0, rows, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norms[r] = squared_norm(data + r * D, D);
  });
  return norms;
}

template std::vector<float> row_squared_norms<float>(const at::Tensor&);
template std::vector<double> row_squared_norms<double>(const at::Tensor&);

}  // namespace fastmeta
