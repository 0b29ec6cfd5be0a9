// Prototypical cross-entropy, CPU kernels (docs/kernel-math.md section 1).
//
// Logits z[m, k] = tau f(q_m, c_k) for the distance (protonet.h's Distance). Squared
// Euclidean: -tau ||q_m - c_k||^2 = tau (2 q_m . c_k - ||c_k||^2) - tau ||q_m||^2; the
// last term is the same for every class and cancels in the softmax, so the kernels use
// z'[m, k] = tau (2 Q C^T - ||c||^2) [m, k]: one GEMM plus an epilogue. Euclidean and
// cosine: one GEMM, then score_rows turns each row of Q C^T into f in place (from the
// row norms; euclidean entries that cancel recomputed directly) before the epilogue.
//
// forward : Z = Q C^T (ATen batched GEMM, [B, M, C]); then each block of rows, in L1,
//           turns into z', its max and argmax, exp(z' - max) (vector_exp.h) and the
//           softmax, with loss_m = lse_m - z'_{m, y_m}: one read and one write of Z.
//           Returns (losses [B, M], predictions [B, M], softmax [B, M, C]).
// backward: with G = (softmax - onehot(y)) * grad_losses, a weight matrix W, row and
//           column coefficients u, v (fastmeta/ops/prototypical_cross_entropy.py):
//             d_Q = tau (W C + u Q),  d_C = tau (W^T Q + v C),  d_tau = sum(G f).
//           Squared Euclidean: W = 2 G (one pass, which also takes the column sums of
//           G in a fixed order), u = 0, v = -2 colsum(G):
//             d_Q   = 2 tau G C                        (the GEMM's alpha scales)
//             d_C   = 2 tau (G^T Q - colsum(G) * C)
//             d_tau = sum(G * (2 Q C^T - ||c||^2)) = 2 sum_k c_k . (G^T Q)_k - colsum(G) . ||c||^2
//           (the last form needs no copy of Z and only [C, D] work: it is read in
//           the pass that finishes d_C). Two GEMMs; nothing after them touches [M, D].
//           Euclidean: Z = Q C^T again (a third GEMM) and score_rows give d; W = G / d
//           (0 at d = 0), u = -rowsum(W), v = -colsum(W), d_tau = -sum(G d), all in the
//           pass that makes W. Cosine: W = G / (n_q n_c) (n = max(||x||, eps)); u and v
//           from the GEMMs' rows: u_m = -q_m . (W C)_m / ||q_m||^2 (0 where n_q = eps),
//           likewise v; d_tau = sum_k c_k . (W^T Q)_k. Both finish d_Q in a pass over [M, D].
//           A large G is made and multiplied a chunk of rows at a time (kChunkBytes).
//
// No FP trap semantics in this file (results unchanged: no reassociation, no flush to
// zero), so that GCC if-converts vector_exp's selects and vectorizes the softmax in
// the AVX2/AVX-512 clones (see vector_exp.h). The pragma comes before any code: GCC
// applies it per function, and both the loops and the inlined vector_exp need it.
// Not set for the whole extension: it stops window_pool.h's pooling loop vectorizing.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../protonet.h"
#include "large_alloc.h"
#include "parallel_grain.h"
#include "refined_distance.h"
#include "row_norms.h"
#include "simd_clones.h"
#include "vector_exp.h"

namespace fastmeta {
namespace {

constexpr int64_t kRowsPerTask = 64;  // rows per column-sum partial (fixed: deterministic)
constexpr int64_t kChunkBytes = int64_t(8) << 20;  // the most of G the backward holds

// Rows [begin, end) of Z = Q C^T [rows, C] (episode of row r: r / M) into the softmax
// of z' = tau (2 Z - ||c||^2) (kScores: Z holds the scores f, z' = tau f; norms is not
// read), in place; loss_r = lse - z'_{y_r}, pred_r = the first
// index of the largest logit, or of the first NaN (torch.argmax's rule: NaN is largest). Blocks of
// rows stay in L1 for three passes: per row the logits, their max and argmax, and z' - max; then
// exp over the whole block (one contiguous vector loop, so that C = 5 vectorizes as well as C =
// 1000); then per row the sum and the normalization.
template <bool kScores, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES void softmax_rows(scalar_t* z, const acc_t* norms, const int64_t* y, int64_t M,
                                       int64_t C, acc_t t, int64_t begin, int64_t end,
                                       scalar_t* loss, int64_t* pred) {
  constexpr int64_t kBlockElements = 4096, kMaxBlockRows = 256;
  const int64_t block_rows = std::clamp<int64_t>(kBlockElements / C, 1, kMaxBlockRows);
  acc_t label_shifted[kMaxBlockRows];  // z'_{y_r} - max_r
  for (int64_t r0 = begin; r0 < end; r0 += block_rows) {
    const int64_t r1 = std::min(end, r0 + block_rows);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = z + r * C;
      const acc_t* cn = kScores ? nullptr : norms + r / M * C;
      acc_t best = -std::numeric_limits<acc_t>::infinity();
      int nan_seen = 0;
      _Pragma("omp simd reduction(max : best) reduction(| : nan_seen)")
      for (int64_t k = 0; k < C; ++k) {
        const acc_t logit = kScores ? t * acc_t(row[k]) : t * (acc_t(2) * acc_t(row[k]) - cn[k]);
        row[k] = static_cast<scalar_t>(logit);
        best = std::max(best, logit);  // NaN skipped
        nan_seen |= logit != logit;
      }
      int64_t arg = 0;  // the first NaN, else the first maximum
      for (int64_t k = 0; k < C; ++k) {
        const acc_t logit = acc_t(row[k]);
        if (nan_seen ? logit != logit : logit == best) {
          arg = k;
          break;
        }
      }
      pred[r] = arg;
      _Pragma("omp simd")
      for (int64_t k = 0; k < C; ++k) row[k] = static_cast<scalar_t>(acc_t(row[k]) - best);
      label_shifted[r - r0] = row[y[r]];
    }
    scalar_t* block = z + r0 * C;
    _Pragma("omp simd")
    for (int64_t i = 0; i < (r1 - r0) * C; ++i) {
      block[i] = static_cast<scalar_t>(vector_exp(acc_t(block[i])));
    }
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = z + r * C;
      acc_t sum = 0;
      _Pragma("omp simd reduction(+ : sum)")
      for (int64_t k = 0; k < C; ++k) sum += acc_t(row[k]);
      const acc_t inv = acc_t(1) / sum;
      _Pragma("omp simd")
      for (int64_t k = 0; k < C; ++k) row[k] = static_cast<scalar_t>(acc_t(row[k]) * inv);
      loss[r] = static_cast<scalar_t>(std::log(sum) - label_shifted[r - r0]);
    }
  }
}

// softmax_rows for C <= kLaneClasses, where a row is shorter than a vector: groups of
// kLaneRows rows are transposed into L1 so that the rows are the vector lanes and
// every step (max, first argmax, exp, sum) is one vector loop over the group per
// class. Same results as softmax_rows up to the order of each row's sum.
constexpr int64_t kLaneClasses = 16, kLaneRows = 64;

template <bool kScores, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES void softmax_rows_few_classes(scalar_t* z, const acc_t* norms,
                                                   const int64_t* y, int64_t M, int64_t C, acc_t t,
                                                   int64_t begin, int64_t end, scalar_t* loss,
                                                   int64_t* pred) {
  acc_t T[kLaneClasses][kLaneRows];  // T[k][i] = z'[r0 + i, k], then its exp
  acc_t best[kLaneRows], sum[kLaneRows], label_shifted[kLaneRows];
  int64_t arg[kLaneRows];
  for (int64_t r0 = begin; r0 < end; r0 += kLaneRows) {
    const int64_t n = std::min(kLaneRows, end - r0);
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = z + (r0 + i) * C;
      if constexpr (kScores) {
        for (int64_t k = 0; k < C; ++k) T[k][i] = t * acc_t(row[k]);
      } else {
        const acc_t* cn = norms + (r0 + i) / M * C;
        for (int64_t k = 0; k < C; ++k) T[k][i] = t * (acc_t(2) * acc_t(row[k]) - cn[k]);
      }
    }
    for (int64_t i = 0; i < n; ++i) best[i] = -std::numeric_limits<acc_t>::infinity();
    for (int64_t k = 0; k < C; ++k) {
      for (int64_t i = 0; i < n; ++i) best[i] = std::max(best[i], T[k][i]);  // NaN skipped
    }
    for (int64_t i = 0; i < n; ++i) arg[i] = 0;  // the first NaN, else the first maximum
    for (int64_t k = C - 1; k >= 0; --k) {
      for (int64_t i = 0; i < n; ++i) arg[i] = T[k][i] == best[i] ? k : arg[i];
    }
    for (int64_t k = C - 1; k >= 0; --k) {
      for (int64_t i = 0; i < n; ++i) arg[i] = T[k][i] != T[k][i] ? k : arg[i];
    }
    for (int64_t i = 0; i < n; ++i) label_shifted[i] = T[y[r0 + i]][i] - best[i];
    for (int64_t i = 0; i < n; ++i) sum[i] = 0;
    for (int64_t k = 0; k < C; ++k) {
      for (int64_t i = 0; i < n; ++i) {
        T[k][i] = vector_exp(T[k][i] - best[i]);
        sum[i] += T[k][i];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* row = z + (r0 + i) * C;
      const acc_t inv = acc_t(1) / sum[i];
      for (int64_t k = 0; k < C; ++k) row[k] = static_cast<scalar_t>(T[k][i] * inv);
      loss[r0 + i] = static_cast<scalar_t>(std::log(sum[i]) - label_shifted[i]);
      pred[r0 + i] = arg[i];
    }
  }
}

// The per-row and per-column terms of the scores f of a distance other than the
// squared Euclidean one: ||q||^2 and ||c||^2 (euclidean), 1 / max(||q||, eps) and
// 1 / max(||c||, eps) (cosine); [B * M] and [B * C]. Also the squared norms.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct ScoreTerms {
  std::vector<acc_t> qn, cn, rows, cols;

  ScoreTerms(Distance distance, const at::Tensor& queries, const at::Tensor& prototypes)
      : qn(row_squared_norms<scalar_t>(queries)), cn(row_squared_norms<scalar_t>(prototypes)) {
    rows = qn, cols = cn;
    if (distance == Distance::kCosine) {
      for (auto* terms : {&rows, &cols}) {
        for (acc_t& v : *terms) v = acc_t(1) / std::max(std::sqrt(v), acc_t(kCosineEps));
      }
    }
  }
};

// n rows of Z = Q C^T [n, C], the first of them row `row0` of [B * M] (episode r / M),
// into the scores f of the distance (not kSquaredEuclidean), in place:
// euclidean -sqrt(||q - c||^2) (refined_distance.h), cosine Z / (n_q n_c).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void score_rows(Distance distance, scalar_t* z, int64_t row0, int64_t n,
                const ScoreTerms<scalar_t>& terms, const scalar_t* q, const scalar_t* c, int64_t M,
                int64_t C, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = row0 + i, b = r / M;
    scalar_t* row = z + i * C;
    const acc_t* cols = terms.cols.data() + b * C;
    if (distance == Distance::kEuclidean) {
      const scalar_t* qr = q + r * D;
      for (int64_t k = 0; k < C; ++k) {
        const double squared = refined_squared_distance(
            double(row[k]), double(terms.rows[r]), double(cols[k]), qr, c + (b * C + k) * D, D);
        row[k] = static_cast<scalar_t>(-std::sqrt(std::max(squared, 0.0)));  // NaN stays
      }
    } else {
      const acc_t scale = terms.rows[r];
      for (int64_t k = 0; k < C; ++k)
        row[k] = static_cast<scalar_t>(acc_t(row[k]) * scale * cols[k]);
    }
  }
}

// n rows of the weights W of the euclidean backward in place of the scores f = -d
// they hold: W = G / d (0 where d is not positive) with G = (p - onehot(y)) * go;
// adds each row's W into colsum [C] in row order, writes -rowsum(W) into u [n] and
// each row's share of d_tau, -sum(G d) = -sum(G (d - d_y)) (as sum_k G = 0: the shift
// by the label's distance keeps the softmax's rounding, sum_k G = O(eps), from being
// multiplied by the distances' common part), into terms [n], in double.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES void euclidean_weight_rows(const scalar_t* p, const scalar_t* go,
                                                const int64_t* y, int64_t C, int64_t n, scalar_t* w,
                                                acc_t* colsum, acc_t* u, double* terms) {
  for (int64_t r = 0; r < n; ++r) {
    const acc_t scale = go[r];
    const int64_t label = y[r];
    const scalar_t* pr = p + r * C;
    scalar_t* wr = w + r * C;
    const double d_label = -double(wr[label]);
    acc_t rowsum = 0;
    double term = 0;
    _Pragma("omp simd reduction(+ : rowsum, term)")
    for (int64_t k = 0; k < C; ++k) {
      const acc_t d = -acc_t(wr[k]);
      const acc_t g = (acc_t(pr[k]) - acc_t(k == label)) * scale;
      const acc_t v = d > 0 ? g / d : acc_t(0);
      wr[k] = static_cast<scalar_t>(v);
      rowsum += v;
      colsum[k] += v;
      term += double(g) * (double(d) - d_label);
    }
    u[r] = -rowsum;
    terms[r] = -term;
  }
}

// n rows of the weights W = G / (n_q n_c), G = (p - onehot(y)) * go, of the cosine
// backward (rows [n] and cols [C] hold 1 / n_q of these rows and 1 / n_c of their
// episode); g_sums [n] receives each row's sum_k G (O(eps), for d_tau), in double.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES void cosine_weight_rows(const scalar_t* p, const scalar_t* go,
                                             const int64_t* y, int64_t C, int64_t n,
                                             const acc_t* rows, const acc_t* cols, scalar_t* w,
                                             double* g_sums) {
  for (int64_t r = 0; r < n; ++r) {
    const acc_t scale = go[r];
    const int64_t label = y[r];
    const scalar_t* pr = p + r * C;
    scalar_t* wr = w + r * C;
    double g_sum = 0;
    _Pragma("omp simd reduction(+ : g_sum)")
    for (int64_t k = 0; k < C; ++k) {
      const acc_t g = (acc_t(pr[k]) - acc_t(k == label)) * scale;
      wr[k] = static_cast<scalar_t>(g * rows[r] * cols[k]);
      g_sum += double(g);
    }
    g_sums[r] = g_sum;
  }
}

// n rows of G = (softmax - onehot(y)) * grad_losses [n, C] from the rows p, go, y of
// the forward's softmax, grad_losses and labels, adding each row into colsum [C] in
// row order.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES void gradient_rows(const scalar_t* p, const scalar_t* go, const int64_t* y,
                                        int64_t C, int64_t n, scalar_t* g, acc_t* colsum) {
  for (int64_t r = 0; r < n; ++r) {
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

// One row of a gradient, in place: out = scale (out + coef x) (d_c = 2 tau (G^T Q - s c)
// of the squared distance, with coef = -s and scale = 2 tau; tau (W C + u q) and
// tau (W^T Q + v c) of the others); returns x . out (the old out; for d_tau), in double.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
FASTMETA_SIMD_CLONES double finish_gradient_row(scalar_t* out, const scalar_t* x, int64_t D,
                                                acc_t coef, acc_t scale) {
  double dot = 0;
  _Pragma("omp simd reduction(+ : dot)")
  for (int64_t j = 0; j < D; ++j) {
    dot += double(x[j]) * double(out[j]);
    out[j] = static_cast<scalar_t>(scale * (acc_t(out[j]) + coef * acc_t(x[j])));
  }
  return dot;
}

// x . y over D, in double.
template <typename scalar_t>
FASTMETA_SIMD_CLONES double row_dot(const scalar_t* x, const scalar_t* y, int64_t D) {
  double dot = 0;
  _Pragma("omp simd reduction(+ : dot)")
  for (int64_t j = 0; j < D; ++j) dot += double(x[j]) * double(y[j]);
  return dot;
}

// The coefficient -x . g / ||x||^2 of a cosine gradient row g = (W C)_m or (W^T Q)_k
// (the derivative through x's norm), 0 where the norm is clamped to eps.
template <typename acc_t>
acc_t cosine_coefficient(double x_dot_g, acc_t squared_norm) {
  return std::sqrt(squared_norm) > acc_t(kCosineEps) ? acc_t(-x_dot_g / double(squared_norm))
                                                     : acc_t(0);
}

void check_label_range(const char* op, const at::Tensor& labels, int64_t C) {
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < labels.numel(); ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < C, op, ": query label ", y[r], " is outside [0, ", C, ")");
  }
}

}  // namespace

// Cross-entropy of the logits z = tau f(q, c) of the distance (protonet.h) over the
// classes: returns (losses [B, M], predictions [B, M] int64, softmax [B, M, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_forward_cpu(
    const at::Tensor& queries, const at::Tensor& prototypes, const at::Tensor& labels,
    const at::Tensor& tau, int64_t distance_code) {
  const EpisodeShape shape =
      check_cross_entropy_forward(c10::kCPU, queries, prototypes, labels, tau, distance_code);
  const auto distance = static_cast<Distance>(distance_code);
  const int64_t B = shape.B, M = shape.M, C = shape.C, D = shape.D;
  check_label_range("prototypical_cross_entropy", labels, C);
  // Q C^T into a pooled buffer (a fresh 40 MB output costs more in page faults than
  // the epilogue), then turned into the softmax in place.
  at::Tensor softmax = empty_cpu_large({B, M, C}, queries.options());
  at::bmm_out(softmax, queries, prototypes.transpose(1, 2));
  at::Tensor losses = at::empty({B, M}, queries.options());
  at::Tensor predictions = at::empty({B, M}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_cross_entropy_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t t = acc_t(*tau.const_data_ptr<scalar_t>());  // a CPU read, not a sync
    const int64_t* y = labels.const_data_ptr<int64_t>();
    scalar_t* p = softmax.mutable_data_ptr<scalar_t>();
    scalar_t* loss = losses.mutable_data_ptr<scalar_t>();
    int64_t* pred = predictions.mutable_data_ptr<int64_t>();
    if (distance == Distance::kSquaredEuclidean) {
      const auto cn = row_squared_norms<scalar_t>(prototypes);
      at::parallel_for(0, B * M, grain_for(C), [&](int64_t begin, int64_t end) {
        if (C <= kLaneClasses) {
          softmax_rows_few_classes<false>(p, cn.data(), y, M, C, t, begin, end, loss, pred);
        } else {
          softmax_rows<false>(p, cn.data(), y, M, C, t, begin, end, loss, pred);
        }
      });
      return;
    }
    const ScoreTerms<scalar_t> terms(distance, queries, prototypes);
    const scalar_t* q = queries.const_data_ptr<scalar_t>();
    const scalar_t* c = prototypes.const_data_ptr<scalar_t>();
    const acc_t* unread = nullptr;  // the scores need no norms
    at::parallel_for(0, B * M, grain_for(C), [&](int64_t begin, int64_t end) {
      score_rows(distance, p + begin * C, begin, end - begin, terms, q, c, M, C, D);
      if (C <= kLaneClasses) {
        softmax_rows_few_classes<true>(p, unread, y, M, C, t, begin, end, loss, pred);
      } else {
        softmax_rows<true>(p, unread, y, M, C, t, begin, end, loss, pred);
      }
    });
  });
  return {losses, predictions, softmax};
}

// Given grad_losses [B, M] and the forward's softmax: (d_queries, d_prototypes, d_tau).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& queries, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& tau, const at::Tensor& softmax,
    int64_t distance_code) {
  const EpisodeShape shape = check_cross_entropy_backward(
      c10::kCPU, grad_losses, queries, prototypes, labels, tau, softmax, distance_code);
  const auto distance = static_cast<Distance>(distance_code);
  const bool squared = distance == Distance::kSquaredEuclidean;
  const int64_t B = shape.B, M = shape.M, C = shape.C, D = shape.D;
  check_label_range("prototypical_cross_entropy_backward", labels, C);
  if (softmax.numel() == 0 || D == 0) {  // no term: zeros (not 0 * an infinite prototype)
    return {at::zeros_like(queries), at::zeros_like(prototypes), at::zeros_like(tau)};
  }
  // W [B, M, C] (G for the squared distance) whole when small (one batched GEMM pair),
  // else a chunk of rows of one episode at a time (a multiple of kRowsPerTask, so the
  // column-sum partials are the same), so that the backward never holds more than
  // kChunkBytes of it.
  const int64_t row_bytes = C * queries.element_size();
  const bool chunked = B * M * row_bytes > kChunkBytes;
  const int64_t tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t chunk_rows =
      chunked ? std::max<int64_t>(1, kChunkBytes / (row_bytes * kRowsPerTask)) * kRowsPerTask : M;
  at::Tensor G = chunked ? empty_cpu_large({std::min(chunk_rows, M), C}, queries.options())
                         : empty_cpu_large({B, M, C}, queries.options());
  at::Tensor d_queries = empty_cpu_large({B, M, D}, queries.options());
  at::Tensor d_prototypes = empty_cpu_large({B, C, D}, queries.options());
  at::Tensor d_tau;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const scalar_t* p = softmax.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_losses.const_data_ptr<scalar_t>();
    const scalar_t* q = queries.const_data_ptr<scalar_t>();
    const scalar_t* c = prototypes.const_data_ptr<scalar_t>();
    scalar_t* g = G.mutable_data_ptr<scalar_t>();
    const acc_t t = acc_t(*tau.const_data_ptr<scalar_t>());  // a CPU read, not a sync
    const std::optional<ScoreTerms<scalar_t>> terms =
        squared ? std::nullopt
                : std::optional<ScoreTerms<scalar_t>>(std::in_place, distance, queries, prototypes);
    // partial column sums of G (squared) or W (euclidean): [B, tasks, C], reduced below
    // in task order; the euclidean -rowsum(W) [B * M]; the rows' d_tau shares (cosine:
    // first sum_k G) [B * M].
    std::vector<acc_t> partial(B * tasks * C, acc_t(0));
    std::vector<acc_t> u(distance == Distance::kEuclidean ? B * M : 0);
    std::vector<double> row_terms(squared ? 0 : B * M);
    // W's rows [m0, m1) of episode b (m0 a multiple of kRowsPerTask) into g_rows, which
    // holds the rows of Q C^T for the euclidean distance.
    auto fill = [&](int64_t b, int64_t m0, int64_t m1, scalar_t* g_rows, int64_t begin,
                    int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r0 = task * kRowsPerTask, n = std::min(m1, r0 + kRowsPerTask) - r0;
        const int64_t row = b * M + r0;
        scalar_t* w = g_rows + (r0 - m0) * C;
        acc_t* colsum = partial.data() + (b * tasks + task) * C;
        if (distance == Distance::kEuclidean) {
          score_rows(distance, w, row, n, *terms, q, c, M, C, D);
          euclidean_weight_rows(p + row * C, go + row, y + row, C, n, w, colsum, &u[row],
                                &row_terms[row]);
        } else if (distance == Distance::kCosine) {
          cosine_weight_rows(p + row * C, go + row, y + row, C, n, terms->rows.data() + row,
                             terms->cols.data() + b * C, w, &row_terms[row]);
        } else {
          gradient_rows(p + row * C, go + row, y + row, C, n, w, colsum);
        }
      }
    };
    // d_Q = 2 tau G C for the squared distance: the GEMM scales (beta 0: the
    // uninitialized d_queries is not read); W C for the others, finished below.
    const acc_t dq_alpha = squared ? 2 * t : acc_t(1);
    if (!chunked) {
      if (distance == Distance::kEuclidean) at::bmm_out(G, queries, prototypes.transpose(1, 2));
      at::parallel_for(0, B * tasks, grain_for(kRowsPerTask * C), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / tasks;
          fill(b, 0, M, g + b * M * C, task % tasks, task % tasks + 1);
        }
      });
      at::baddbmm_out(d_queries, d_queries, G, prototypes, /*beta=*/0, /*alpha=*/dq_alpha);
      at::bmm_out(d_prototypes, G.transpose(1, 2), queries);  // W^T Q, finished below
    } else {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
          const int64_t m1 = std::min(M, m0 + chunk_rows);
          at::Tensor g_rows = G.narrow(0, 0, m1 - m0);
          const at::Tensor q_rows = queries[b].narrow(0, m0, m1 - m0);
          if (distance == Distance::kEuclidean) at::mm_out(g_rows, q_rows, prototypes[b].t());
          at::parallel_for(m0 / kRowsPerTask, (m1 + kRowsPerTask - 1) / kRowsPerTask,
                           grain_for(kRowsPerTask * C),
                           [&](int64_t begin, int64_t end) { fill(b, m0, m1, g, begin, end); });
          at::Tensor dq = d_queries[b].narrow(0, m0, m1 - m0), gtq = d_prototypes[b];
          at::addmm_out(dq, dq, g_rows, prototypes[b], /*beta=*/0, /*alpha=*/dq_alpha);
          at::addmm_out(gtq, gtq, g_rows.t(), q_rows, /*beta=*/m0 == 0 ? 0 : 1, /*alpha=*/1);
        }
      }
    }
    std::vector<acc_t> colsum(B * C, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t task = 0; task < tasks; ++task) {
        for (int64_t k = 0; k < C; ++k) colsum[b * C + k] += partial[(b * tasks + task) * C + k];
      }
    }
    scalar_t* dq = d_queries.mutable_data_ptr<scalar_t>();
    scalar_t* dc = d_prototypes.mutable_data_ptr<scalar_t>();
    if (!squared) {  // d_Q = tau (W C + u Q)
      at::parallel_for(0, B * M, grain_for(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* qr = q + r * D;
          acc_t coef = u.empty() ? acc_t(0) : u[r];
          if (distance == Distance::kCosine) {
            coef = cosine_coefficient(row_dot(qr, dq + r * D, D), terms->qn[r]);
            // d_tau's row share beside sum_k c_k . (W^T Q)_k below: -f_y sum_k G (see
            // euclidean_weight_rows), f_y = the score of the row's label
            const int64_t k = r / M * C + y[r];
            const double f_label = row_dot(qr, c + k * D, D) * terms->rows[r] * terms->cols[k];
            row_terms[r] *= -f_label;
          }
          finish_gradient_row(dq + r * D, qr, D, coef, t);
        }
      });
    }
    // d_C = 2 tau (G^T Q - colsum(G) * C) (squared), tau (W^T Q + v C) (the others), and
    // c_k . (W^T Q)_k for d_tau.
    std::vector<double> c_dot_gtq(B * C, 0.0);
    at::parallel_for(0, B * C, grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* out = dc + i * D;
        const scalar_t* ci = c + i * D;
        if (distance == Distance::kCosine) {
          c_dot_gtq[i] = row_dot(ci, out, D);
          finish_gradient_row(out, ci, D, cosine_coefficient(c_dot_gtq[i], terms->cn[i]), t);
        } else {
          c_dot_gtq[i] = finish_gradient_row(out, ci, D, -colsum[i], squared ? 2 * t : t);
        }
      }
    });
    // d_tau, summed in a fixed order: squared sum(G * (2 Q C^T - ||c||^2)) =
    // 2 sum_k c_k . (G^T Q)_k - colsum . ||c||^2; euclidean the rows' shares
    // -sum(G (d - d_y)); cosine sum_k c_k . (W^T Q)_k and the rows' -f_y sum_k G.
    double dt = 0;
    if (squared) {
      const auto cn = row_squared_norms<scalar_t>(prototypes);
      for (int64_t i = 0; i < B * C; ++i) {
        dt += 2 * c_dot_gtq[i] - double(colsum[i]) * double(cn[i]);
      }
    } else {
      for (const double term : row_terms) dt += term;
      if (distance == Distance::kCosine) {
        for (const double term : c_dot_gtq) dt += term;
      }
    }
    d_tau = at::empty({}, queries.options()).fill_(dt);
  });
  return {d_queries, d_prototypes, d_tau};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def(
      "prototypical_cross_entropy_forward(Tensor queries, Tensor prototypes, Tensor labels, "
      "Tensor tau, int distance=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "prototypical_cross_entropy_backward(Tensor grad_losses, Tensor queries, Tensor prototypes, "
      "Tensor labels, Tensor tau, Tensor softmax, int distance=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("prototypical_cross_entropy_forward", &prototypical_cross_entropy_forward_cpu);
  m.impl("prototypical_cross_entropy_backward", &prototypical_cross_entropy_backward_cpu);
}

}  // namespace fastmeta
