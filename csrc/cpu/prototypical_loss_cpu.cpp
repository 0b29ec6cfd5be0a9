// Prototypical cross-entropy, CPU kernels (../shared/GUIDE.md section 1).
//
// Logits z[m, k] = -tau ||q_m - c_k||^2 = tau (2 q_m . c_k - ||c_k||^2) - tau ||q_m||^2;
// the last term is the same for every class and cancels in the softmax, so the
// kernels use z'[m, k] = tau (2 Q C^T - ||c||^2) [m, k]: one GEMM plus an epilogue.
//
// forward : Z = Q C^T (ATen batched GEMM, [B, M, C]); then each row, in L1, turns
//           into z', its max and argmax, exp(z' - max) (vector_exp.h) and the softmax,
//           with loss_m = lse_m - z'_{m, y_m}: one read and one write of Z.
//           Returns (losses [B, M], predictions [B, M], softmax [B, M, C]).
// backward: with G = (softmax - onehot(y)) * grad_losses (one pass, which also
//           takes the column sums of G in a fixed order),
//             d_Q   = 2 tau G C
//             d_C   = 2 tau (G^T Q - colsum(G) * C)
//             d_tau = sum(G * (2 Q C^T - ||c||^2)) = 2 sum_m q_m . (G C)_m - colsum(G) . ||c||^2
//           (the last form needs no second copy of Z). Two GEMMs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../protonet.h"
#include "large_alloc.h"
#include "parallel_grain.h"
#include "row_norms.h"
#include "simd_clones.h"
#include "vector_exp.h"

namespace fastmeta {
namespace {

constexpr int64_t kRowsPerTask = 64;  // rows per column-sum partial (fixed: deterministic)

void check_shapes(const at::Tensor& queries, const at::Tensor& prototypes,
                  const at::Tensor& labels, const at::Tensor& tau) {
  check_queries_prototypes("prototypical_ce", queries, prototypes);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.dim() == 2 && labels.size(0) == queries.size(0) &&
                  labels.size(1) == queries.size(1),
              "prototypical_ce: labels must be contiguous int64 [B, M], got ", labels.sizes());
  TORCH_CHECK(tau.dim() == 0 && tau.scalar_type() == queries.scalar_type(),
              "prototypical_ce: tau must be a 0-d tensor of the queries' dtype");
}

// One row of Z = Q C^T [C] into the softmax of z' = tau (2 Z - ||c||^2), in place;
// *loss = lse - z'_label, *pred = the first index of the largest logit.
template <typename scalar_t>
FASTMETA_SIMD_CLONES void softmax_row(scalar_t* row, const at::opmath_type<scalar_t>* norms,
                                      int64_t C, at::opmath_type<scalar_t> t, int64_t label,
                                      scalar_t* loss, int64_t* pred) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  _Pragma("omp simd reduction(max : best)")
  for (int64_t k = 0; k < C; ++k) {
    const acc_t z = t * (acc_t(2) * acc_t(row[k]) - norms[k]);
    row[k] = static_cast<scalar_t>(z);
    best = std::max(best, z);
  }
  int64_t arg = 0;  // the first maximum (0 if every logit is NaN)
  for (int64_t k = 0; k < C; ++k) {
    if (acc_t(row[k]) == best) {
      arg = k;
      break;
    }
  }
  const acc_t label_logit = row[label];
  acc_t sum = 0;
  _Pragma("omp simd reduction(+ : sum)")
  for (int64_t k = 0; k < C; ++k) {
    const acc_t e = vector_exp(acc_t(row[k]) - best);
    row[k] = static_cast<scalar_t>(e);
    sum += e;
  }
  const acc_t inv = acc_t(1) / sum;
  _Pragma("omp simd")
  for (int64_t k = 0; k < C; ++k) row[k] = static_cast<scalar_t>(acc_t(row[k]) * inv);
  *loss = static_cast<scalar_t>(best + std::log(sum) - label_logit);
  *pred = arg;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_ce_forward_cpu(
    const at::Tensor& queries, const at::Tensor& prototypes, const at::Tensor& labels,
    const at::Tensor& tau) {
  check_shapes(queries, prototypes, labels, tau);
  const int64_t B = queries.size(0), M = queries.size(1), C = prototypes.size(1);
  // Q C^T into a pooled buffer (a fresh 40 MB output costs more in page faults than
  // the epilogue), then turned into the softmax in place.
  at::Tensor softmax = empty_cpu_large({B, M, C}, queries.options());
  at::bmm_out(softmax, queries, prototypes.transpose(1, 2));
  at::Tensor losses = at::empty({B, M}, queries.options());
  at::Tensor predictions = at::empty({B, M}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_ce_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto cn = row_squared_norms<scalar_t>(prototypes);
    const acc_t t = tau.item<acc_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    scalar_t* p = softmax.mutable_data_ptr<scalar_t>();
    scalar_t* loss = losses.mutable_data_ptr<scalar_t>();
    int64_t* pred = predictions.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B * M, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = y[r];
        TORCH_CHECK(label >= 0 && label < C, "prototypical_ce: query label ", label,
                    " is outside [0, ", C, ")");
        softmax_row(p + r * C, cn.data() + r / M * C, C, t, label, loss + r, pred + r);
      }
    });
  });
  return {losses, predictions, softmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_ce_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& queries, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& tau, const at::Tensor& softmax) {
  check_shapes(queries, prototypes, labels, tau);
  const int64_t B = queries.size(0), M = queries.size(1), C = prototypes.size(1);
  TORCH_CHECK(softmax.sizes() == at::IntArrayRef({B, M, C}) && softmax.is_contiguous() &&
                  grad_losses.sizes() == labels.sizes() && grad_losses.is_contiguous(),
              "prototypical_ce_backward: softmax [B, M, C] and grad_losses [B, M] expected");
  at::Tensor G = empty_cpu_large({B, M, C}, queries.options());
  const int64_t tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
  at::Tensor d_queries, d_prototypes, d_tau;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_ce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const scalar_t* p = softmax.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_losses.const_data_ptr<scalar_t>();
    scalar_t* g = G.mutable_data_ptr<scalar_t>();
    // partial column sums of G: [B, tasks, C], reduced below in task order.
    std::vector<acc_t> partial(B * tasks * C, acc_t(0));
    at::parallel_for(0, B * tasks, grain_for(kRowsPerTask * C), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tasks, m0 = (task % tasks) * kRowsPerTask;
        acc_t* colsum = partial.data() + task * C;
        for (int64_t m = m0; m < std::min(M, m0 + kRowsPerTask); ++m) {
          const int64_t r = b * M + m;
          TORCH_CHECK(y[r] >= 0 && y[r] < C, "prototypical_ce_backward: query label ", y[r],
                      " is outside [0, ", C, ")");
          const acc_t scale = go[r];
          const scalar_t* pr = p + r * C;
          scalar_t* gr = g + r * C;
          _Pragma("omp simd")
          for (int64_t k = 0; k < C; ++k) {
            const acc_t v = acc_t(pr[k]) * scale;
            gr[k] = static_cast<scalar_t>(v);
            colsum[k] += v;
          }
          gr[y[r]] = static_cast<scalar_t>(acc_t(gr[y[r]]) - scale);  // minus onehot(y)
          colsum[y[r]] -= scale;
        }
      }
    });
    std::vector<scalar_t> colsum(B * C, scalar_t(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < C; ++k) {
        acc_t sum = 0;
        for (int64_t task = 0; task < tasks; ++task) sum += partial[(b * tasks + task) * C + k];
        colsum[b * C + k] = static_cast<scalar_t>(sum);
      }
    }
    const acc_t t = tau.item<acc_t>();
    const auto cn = row_squared_norms<scalar_t>(prototypes);
    d_queries = at::bmm(G, prototypes);                  // G C, scaled in place below
    d_prototypes = at::bmm(G.transpose(1, 2), queries);  // G^T Q, finished below
    const int64_t D = queries.size(2);
    const scalar_t* q = queries.const_data_ptr<scalar_t>();
    const scalar_t* c = prototypes.const_data_ptr<scalar_t>();
    scalar_t* dq = d_queries.mutable_data_ptr<scalar_t>();
    scalar_t* dc = d_prototypes.mutable_data_ptr<scalar_t>();
    // d_Q = 2 tau (G C), and each row's q_m . (G C)_m for d_tau (in double, per row).
    std::vector<double> q_dot_gc(B * M, 0.0);
    at::parallel_for(0, B * M, grain_for(D),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        double dot = 0;
        for (int64_t j = 0; j < D; ++j) {
          dot += double(q[r * D + j]) * double(dq[r * D + j]);
          dq[r * D + j] = static_cast<scalar_t>(2 * t * acc_t(dq[r * D + j]));
        }
        q_dot_gc[r] = dot;
      }
    });
    // d_C = 2 tau (G^T Q - colsum(G) * C).
    at::parallel_for(0, B * C, grain_for(D),
                     [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t s = colsum[i];
        for (int64_t j = 0; j < D; ++j) {
          dc[i * D + j] = static_cast<scalar_t>(
              2 * t * (acc_t(dc[i * D + j]) - s * acc_t(c[i * D + j])));
        }
      }
    });
    double dt = 0;  // d_tau = 2 sum_m q_m . (G C)_m - colsum . ||c||^2, fixed order
    for (double v : q_dot_gc) dt += 2 * v;
    for (int64_t i = 0; i < B * C; ++i) dt -= double(colsum[i]) * double(cn[i]);
    d_tau = at::empty({}, queries.options()).fill_(dt);
  });
  return {d_queries, d_prototypes, d_tau};
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("prototypical_ce_forward", &prototypical_ce_forward_cpu);
  m.impl("prototypical_ce_backward", &prototypical_ce_backward_cpu);
}

}  // namespace fastmeta
