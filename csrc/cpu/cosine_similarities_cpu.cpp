// Cosine similarities between queries and prototypes, CPU kernel.
//
//   s[b, m, k] = (q_bm . c_bk) / (max(||q_bm||, eps) max(||c_bk||, eps))
//                                     queries [B, M, D], prototypes [B, C, D] -> [B, M, C]
// The products come from one batched GEMM (ATen); the row norms are computed once
// (B M + B C of them, not B M C) and one fused pass scales every entry in double,
// rounding once. Each norm is clamped, not its square, so a row of norm below eps
// is divided by eps and a zero row gives exactly 0 (0 * 1/eps), never NaN.
// (The backward is plain differentiable torch ops, in Python.)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../protonet.h"
#include "parallel_grain.h"
#include "row_norms.h"

namespace fastmeta {
namespace {

// 1 / max(||x_r||, eps) for each row r of a contiguous [B, N, D] tensor: [B * N].
// std::max(NaN, eps) is NaN, so NaN rows stay NaN, as in the float64 reference.
template <typename scalar_t>
std::vector<double> inverse_clamped_norms(const at::Tensor& x, double eps) {
  const std::vector<at::opmath_type<scalar_t>> squared = row_squared_norms<scalar_t>(x);
  std::vector<double> inverse(squared.size());
  std::transform(squared.begin(), squared.end(), inverse.begin(),
                 [eps](auto n) { return 1.0 / std::max(std::sqrt(double(n)), eps); });
  return inverse;
}

}  // namespace

at::Tensor cosine_similarities_forward_cpu(const at::Tensor& queries, const at::Tensor& prototypes,
                                           double eps) {
  const EpisodeShape shape =
      check_queries_prototypes("cosine_similarities_forward", c10::kCPU, queries, prototypes);
  const int64_t B = shape.B, M = shape.M, C = shape.C;
  at::Tensor sim = at::bmm(queries, prototypes.transpose(1, 2));  // q . c, [B, M, C]
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "cosine_similarities_forward_cpu", [&] {
    const std::vector<double> inv_q = inverse_clamped_norms<scalar_t>(queries, eps);     // [B M]
    const std::vector<double> inv_c = inverse_clamped_norms<scalar_t>(prototypes, eps);  // [B C]
    scalar_t* s = sim.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * M, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // r = b * M + m
        const double* inv_c_b = inv_c.data() + (r / M) * C;
        scalar_t* row = s + r * C;
        for (int64_t k = 0; k < C; ++k) {
          row[k] = static_cast<scalar_t>(double(row[k]) * inv_q[r] * inv_c_b[k]);
        }
      }
    });
  });
  return sim;
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def("cosine_similarities_forward(Tensor queries, Tensor prototypes, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("cosine_similarities_forward", &cosine_similarities_forward_cpu);
}

}  // namespace fastmeta
