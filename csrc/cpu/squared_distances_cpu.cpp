// Squared Euclidean distances between queries and prototypes, CPU kernel.
//
//   d[b, m, k] = ||q_bm||^2 + ||c_bk||^2 - 2 q_bm . c_bk
// The products come from one batched GEMM (ATen); one fused pass adds the norms.
// Where the three terms cancel (d below kRefine of ||q||^2 + ||c||^2, i.e. nearly
// identical points) the entry is recomputed directly as sum_j (q_j - c_j)^2, so
// identical points give exactly 0 and no entry is negative.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <torch/library.h>

#include "../protonet.h"
#include "parallel_grain.h"
#include "refined_distance.h"
#include "row_norms.h"

namespace fastmeta {

// ||q_m - c_k||^2 [B, M, C]: one GEMM plus a fused pass; entries where the GEMM
// form cancels (near-identical points) are recomputed directly, so identical
// points give exactly 0 and no entry is negative.
at::Tensor squared_distances_forward_cpu(const at::Tensor& queries, const at::Tensor& prototypes) {
  const EpisodeShape shape =
      check_queries_prototypes("squared_distances_forward", c10::kCPU, queries, prototypes);
  const int64_t B = shape.B, M = shape.M, C = shape.C, D = shape.D;
  at::Tensor dist = at::bmm(queries, prototypes.transpose(1, 2));  // q . c, [B, M, C]
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "squared_distances_forward_cpu", [&] {
    const auto qn = row_squared_norms<scalar_t>(queries);
    const auto cn = row_squared_norms<scalar_t>(prototypes);
    const scalar_t* q = queries.const_data_ptr<scalar_t>();
    const scalar_t* c = prototypes.const_data_ptr<scalar_t>();
    scalar_t* d = dist.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * M, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / M;
        const scalar_t* qr = q + r * D;
        scalar_t* row = d + r * C;
        for (int64_t k = 0; k < C; ++k) {
          row[k] = static_cast<scalar_t>(refined_squared_distance(
              double(row[k]), double(qn[r]), double(cn[b * C + k]), qr, c + (b * C + k) * D, D));
        }
      }
    });
  });
  return dist;
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def("squared_distances_forward(Tensor queries, Tensor prototypes) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("squared_distances_forward", &squared_distances_forward_cpu);
}

}  // namespace fastmeta
