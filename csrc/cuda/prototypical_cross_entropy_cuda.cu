// Prototypical cross-entropy, CUDA kernels.
//
// Logits z[m, k] = tau f(q_m, c_k) for the distance (protonet.h's Distance), a template
// parameter of each kernel (the host switches on it once). Squared Euclidean:
// -tau ||q_m - c_k||^2 = tau (2 q_m . c_k - ||c_k||^2) - tau ||q_m||^2; the last term is
// the same for every class and cancels in the softmax, so the kernels use
// z'[m, k] = tau (2 Q C^T - ||c||^2) [m, k]: one GEMM plus an epilogue. Euclidean:
// f = -sqrt(s) with s = ||q - c||^2 from Q C^T by squared_distances' epilogue
// (protonet_cuda.cuh: refined where it cancels). Cosine: f = Z / (n_q n_c) with
// n = max(||x||, eps).
// Shapes: queries Q [B, M, D], prototypes C [B, C, D], labels y [B, M] int64,
// tau 0-d (read on the device: no host sync).
//
// forward : Z = Q C^T (at::bmm, [B, M, C]; squared distances for euclidean); then one
//           warp per row (b, m) turns its row in place into z' = tau f (score()),
//           takes the max and argmax (ties -> lowest index; a NaN
//           logit wins, the first one, as in torch.argmax),
//           lse = max + log sum_k exp(z'_k - max), loss = lse - z'_y, and leaves the
//           softmax exp(z' - lse) in the row. Returns (losses [B, M], predictions
//           [B, M] int64, softmax [B, M, C]).
// backward: with G = (softmax - onehot(y)) * grad_losses[..., None] [B, M, C], a weight
//           matrix W, row and column coefficients u, v (fastmeta/ops/
//           prototypical_cross_entropy.py): d_Q = tau (W C + u Q), d_C = tau (W^T Q + v C),
//           d_tau = sum(G f). Squared Euclidean (W = 2 G, u = 0, v = -2 colsum(G)):
//             d_Q   = 2 tau G C
//             d_C   = 2 tau (G^T Q - colsum(G) c)
//             d_tau = sum(G * (2 Q C^T - ||c||^2)) = 2 sum_m q_m . (G C)_m - colsum(G) . ||c||^2
//           Euclidean: W = G / d (0 at d = 0), u = -rowsum(W), v = -colsum(W),
//           d_tau = -sum(G d), with d recomputed (at::bmm and the refining epilogue).
//           Cosine: W = G / (n_q n_c), u_m = -q_m . (W C)_m / ||q_m||^2,
//           v_k = -c_k . (W^T Q)_k / ||c_k||^2 (0 where the norm is clamped),
//           d_tau = sum_k c_k . (W^T Q)_k.
//           d_tau = sum(G f) is taken as sum(G (f - f_y)) (as sum_k G = 0: the shift by
//           the score of the row's label keeps the softmax's rounding, sum_k G = O(eps),
//           from being multiplied by the scores' common part): euclidean term by term,
//           cosine as sum_k c_k . (W^T Q)_k - sum_m f_{m,y} sum_k G.
//           1. grad_logits_kernel: blocks of (episode, chunk of kRowsPerChunk rows)
//              x (tile of 32 columns) write G (W) and the chunk's column sums of G (W)
//              (8 row groups per block, combined in a fixed order) into partials
//              [B, chunks, C]; euclidean: also each row's sums of W and G (d - d_y)
//              over the tile, cosine of G, into row_partials [B * M, tiles, 2] (a warp
//              per row and tile, in double);
//           2. at::bmm: G C [B, M, D] and G^T Q [B, C, D];
//           3. backward_epilogue_kernel: one warp per row of d_Q (scales G C by
//              2 tau; term_m = 2 q_m . (G C)_m) and per row of d_C (colsum(G)_k
//              summed from the partials in a fixed order; 2 tau (G^T Q - colsum c);
//              term_k = -colsum_k ||c_k||^2), terms in double (the other distances:
//              tau (W C + u q) with u from row_partials or q . (W C), term_m = -sum(G d)
//              of the row; tau (W^T Q + v c), term_k = c_k . (W^T Q)_k for cosine);
//           4. sum_to_scalar_kernel: one block sums the terms in a fixed order, in double.
//           Every output has one writer and a fixed summation order: no atomics,
//           deterministic.
// A label outside [0, C) (the Python op rejects these) is not indexed: it gives a
// NaN loss in the forward and NaN gradients in the backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "../protonet.h"
#include "protonet_cuda.cuh"
#include "sum_to_scalar.cuh"

namespace fastmeta {
namespace {

constexpr int kTileColumns = kWarpSize;                  // grad_logits_kernel block: x
constexpr int kRowGroups = kThreads / kTileColumns;      //                           y
constexpr int64_t kRowsPerChunk = 64;  // rows per column-sum partial (fixed: deterministic)

// max(sqrt(squared_norm), eps): the cosine distance's clamped norm.
template <typename acc_t>
__device__ __forceinline__ acc_t clamped_norm(acc_t squared_norm) {
  return ::max(::sqrt(squared_norm), acc_t(kCosineEps));
}

// The score f of one entry from v = Z[r, k] (the squared distance for euclidean) and
// qn = ||q_r||^2, cn = ||c_k||^2.
template <Distance kDistance, typename acc_t>
__device__ __forceinline__ acc_t score(acc_t v, acc_t qn, acc_t cn) {
  if constexpr (kDistance == Distance::kEuclidean) {
    return -::sqrt(v < 0 ? acc_t(0) : v);  // NaN stays NaN
  } else if constexpr (kDistance == Distance::kCosine) {
    return v / (clamped_norm(qn) * clamped_norm(cn));
  } else {
    return acc_t(2) * v - cn;
  }
}

// z [B * M, C] holds Q C^T (squared distances for euclidean) on entry and the softmax on
// exit; qn [B * M] = ||q||^2 (read for cosine), cn [B * C] = ||c||^2.
template <Distance kDistance, typename scalar_t>
__global__ void ce_forward_kernel(scalar_t* __restrict__ z,
                                  const at::opmath_type<scalar_t>* __restrict__ qn,
                                  const at::opmath_type<scalar_t>* __restrict__ cn,
                                  const int64_t* __restrict__ labels,
                                  const scalar_t* __restrict__ tau, scalar_t* __restrict__ losses,
                                  int64_t* __restrict__ predictions, int64_t rows, int64_t M,
                                  int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t t = tau[0];
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       r < rows; r += warps) {
    scalar_t* row = z + r * C;
    const acc_t* norms = cn + (r / M) * C;
    const acc_t q_norm = kDistance == Distance::kCosine ? qn[r] : acc_t(0);
    const int64_t y = labels[r];
    // Each lane owns the columns k = lane (mod 32) in all three passes, so no lane
    // reads what another lane wrote; the lane owning y keeps z'_y.
    acc_t best = -std::numeric_limits<acc_t>::infinity(), z_y = 0;
    int64_t arg = 0, first_nan = C;  // C: no NaN logit (torch.argmax: NaN is largest)
    for (int64_t k = lane; k < C; k += kWarpSize) {
      const acc_t v = t * score<kDistance>(acc_t(row[k]), q_norm, norms[k]);
      row[k] = static_cast<scalar_t>(v);
      if (v > best) best = v, arg = k;
      if (v != v && first_nan == C) first_nan = k;
      if (k == y) z_y = v;
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {  // (max, lowest index)
      const acc_t other = __shfl_xor_sync(kFullMask, best, offset);
      const int64_t other_arg = __shfl_xor_sync(kFullMask, arg, offset);
      if (other > best || (other == best && other_arg < arg)) best = other, arg = other_arg;
      const int64_t other_nan = __shfl_xor_sync(kFullMask, first_nan, offset);
      if (other_nan < first_nan) first_nan = other_nan;
    }
    if (first_nan < C) arg = first_nan;
    acc_t sum = 0;
    for (int64_t k = lane; k < C; k += kWarpSize) sum += ::exp(acc_t(row[k]) - best);
    const acc_t lse = best + ::log(warp_sum(sum));
    const bool valid = y >= 0 && y < C;
    if (valid ? y % kWarpSize == lane : lane == 0) {
      losses[r] =
          valid ? static_cast<scalar_t>(lse - z_y) : std::numeric_limits<scalar_t>::quiet_NaN();
    }
    if (lane == 0) predictions[r] = arg;
    for (int64_t k = lane; k < C; k += kWarpSize) {
      row[k] = static_cast<scalar_t>(::exp(acc_t(row[k]) - lse));
    }
  }
}

// G [B, M, C] = (softmax - onehot(y)) * go[..., None], or the weights W of the
// other distances: G / d (euclidean, dist [B, M, C] holding d^2), G / (n_q n_c) (cosine;
// qn [B * M], cn [B * C] the squared norms); partials [B, chunks, C]: the column sums of
// G (W) over each chunk of kRowsPerChunk rows; row_partials [B * M, tiles, 2]: each
// row's sums over each tile of columns of W and G (d - d_y) (euclidean) or of G in the
// second place (cosine). Block (kTileColumns, kRowGroups); x over (episode, chunk), y
// over column tiles.
template <Distance kDistance, typename scalar_t>
__global__ void grad_logits_kernel(
    const scalar_t* __restrict__ softmax, const scalar_t* __restrict__ go,
    const int64_t* __restrict__ labels, const at::opmath_type<scalar_t>* __restrict__ qn,
    const at::opmath_type<scalar_t>* __restrict__ cn, const scalar_t* __restrict__ dist,
    scalar_t* __restrict__ G, at::opmath_type<scalar_t>* __restrict__ partials,
    double* __restrict__ row_partials, int64_t B, int64_t M, int64_t C, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile[kRowGroups][kTileColumns];
  const int64_t tiles = (C + kTileColumns - 1) / kTileColumns;
  for (int64_t task = blockIdx.x; task < B * chunks; task += gridDim.x) {  // block-uniform
    const int64_t b = task / chunks, m0 = (task % chunks) * kRowsPerChunk;
    const int64_t m1 = std::min(M, m0 + kRowsPerChunk);
    for (int64_t k0 = int64_t(blockIdx.y) * kTileColumns; k0 < C;
         k0 += int64_t(gridDim.y) * kTileColumns) {  // block-uniform
      const int64_t k = k0 + threadIdx.x;
      acc_t sum = 0;
      // warp-uniform (a warp is one row group): the warp sums below
      for (int64_t m = m0 + threadIdx.y; m < m1; m += kRowGroups) {
        const int64_t r = b * M + m, y = labels[r];
        const bool valid = y >= 0 && y < C;
        acc_t v = 0;
        double term = 0;  // G (d - d_y) (euclidean), G (cosine)
        if (k < C) {
          const acc_t scale = valid ? acc_t(go[r]) : std::numeric_limits<acc_t>::quiet_NaN();
          const acc_t g = (acc_t(softmax[r * C + k]) - acc_t(k == y)) * scale;
          if constexpr (kDistance == Distance::kEuclidean) {
            const acc_t d = -score<kDistance>(acc_t(dist[r * C + k]), acc_t(0), acc_t(0));
            const acc_t d_y =
                valid ? -score<kDistance>(acc_t(dist[r * C + y]), acc_t(0), acc_t(0)) : d;
            v = d > 0 ? g / d : acc_t(0);
            term = double(g) * (double(d) - double(d_y));
          } else if constexpr (kDistance == Distance::kCosine) {
            v = g / (clamped_norm(qn[r]) * clamped_norm(cn[b * C + k]));
            term = double(g);
          } else {
            v = g;
          }
          G[r * C + k] = static_cast<scalar_t>(v);
          sum += v;
        }
        if constexpr (kDistance != Distance::kSquaredEuclidean) {
          const double row_sum = warp_sum(double(v)), row_term = warp_sum(term);
          if (threadIdx.x == 0) {
            double* out = row_partials + (r * tiles + k0 / kTileColumns) * 2;
            out[0] = row_sum, out[1] = row_term;
          }
        }
      }
      tile[threadIdx.y][threadIdx.x] = sum;
      __syncthreads();
      if (threadIdx.y == 0 && k < C) {
        acc_t total = 0;
        for (int g = 0; g < kRowGroups; ++g) total += tile[g][threadIdx.x];
        partials[task * C + k] = total;
      }
      __syncthreads();  // the tile is reused by the next column tile
    }
  }
}

// x . y over D (lanes strided over D, then a warp_sum), in double.
template <typename scalar_t>
__device__ double warp_dot(const scalar_t* x, const scalar_t* y, int64_t D, int lane) {
  double dot = 0;
  for (int64_t j = lane; j < D; j += kWarpSize) dot += double(x[j]) * double(y[j]);
  return warp_sum(dot);
}

// out = scale (out + coef x) over D (the lanes' elements).
template <typename scalar_t, typename acc_t>
__device__ void finish_row(scalar_t* out, const scalar_t* x, int64_t D, acc_t coef, acc_t scale,
                           int lane) {
  for (int64_t j = lane; j < D; j += kWarpSize) {
    out[j] = static_cast<scalar_t>(scale * (acc_t(out[j]) + coef * acc_t(x[j])));
  }
}

// The coefficient -x . g / ||x||^2 of a cosine gradient row g = (W C)_m or (W^T Q)_k
// (the derivative through x's norm), 0 where the norm is clamped to eps.
template <typename acc_t>
__device__ acc_t cosine_coefficient(double x_dot_g, acc_t squared_norm) {
  return ::sqrt(squared_norm) > acc_t(kCosineEps) ? acc_t(-x_dot_g / double(squared_norm))
                                                  : acc_t(0);
}

// Rows [0, B*M) of d_q [B*M, D] hold G C (W C), rows of d_c [B*C, D] hold G^T Q (W^T Q)
// on entry; both are finished in place. terms[B*M + B*C] receives each row's share of
// d_tau. qn, cn: squared norms (cosine); row_partials: grad_logits_kernel's.
template <Distance kDistance, typename scalar_t>
__global__ void backward_epilogue_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ c,
    const scalar_t* __restrict__ tau, const int64_t* __restrict__ labels,
    const at::opmath_type<scalar_t>* __restrict__ partials, const double* __restrict__ row_partials,
    const at::opmath_type<scalar_t>* __restrict__ qn,
    const at::opmath_type<scalar_t>* __restrict__ cn, scalar_t* __restrict__ d_q,
    scalar_t* __restrict__ d_c, double* __restrict__ terms, int64_t B, int64_t M, int64_t C,
    int64_t D, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSquared = kDistance == Distance::kSquaredEuclidean;
  const acc_t t = tau[0], two_tau = acc_t(2) * t;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t q_rows = B * M, rows = q_rows + B * C;
  const int64_t tiles = (C + kTileColumns - 1) / kTileColumns;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       r < rows; r += warps) {  // warp-uniform: the branches below are too
    double term = 0;
    if (r < q_rows && kSquared) {  // d_q = 2 tau (G C); term = 2 q . (G C)
      const scalar_t* qr = q + r * D;
      scalar_t* dqr = d_q + r * D;
      double dot = 0;
      for (int64_t j = lane; j < D; j += kWarpSize) {
        const scalar_t gc = dqr[j];
        dot += double(qr[j]) * double(gc);
        dqr[j] = static_cast<scalar_t>(two_tau * acc_t(gc));
      }
      term = 2 * warp_sum(dot);
    } else if (r < q_rows) {  // d_q = tau (W C + u q)
      const scalar_t* qr = q + r * D;
      double row_sum = 0, row_term = 0;
      for (int64_t i = lane; i < tiles; i += kWarpSize) {
        row_sum += row_partials[(r * tiles + i) * 2];
        row_term += row_partials[(r * tiles + i) * 2 + 1];
      }
      row_sum = warp_sum(row_sum), row_term = warp_sum(row_term);
      acc_t u;
      if constexpr (kDistance == Distance::kEuclidean) {  // -rowsum(W); -sum(G (d - d_y))
        u = acc_t(-row_sum);
        term = -row_term;
      } else {  // the rows' share of d_tau: -f_y sum_k G
        u = cosine_coefficient(warp_dot(qr, d_q + r * D, D, lane), qn[r]);
        const int64_t y = labels[r], k = r / M * C + y;
        const bool valid = y >= 0 && y < C;
        const double f_label =
            valid ? warp_dot(qr, c + k * D, D, lane) /
                        double(clamped_norm(qn[r]) * clamped_norm(cn[valid ? k : 0]))
                  : std::numeric_limits<double>::quiet_NaN();
        term = -f_label * row_term;
      }
      finish_row(d_q + r * D, qr, D, u, t, lane);
    } else {  // d_c = 2 tau (G^T Q - colsum c); term = -colsum ||c||^2 (squared)
      const int64_t i = r - q_rows, b = i / C, k = i % C;
      acc_t colsum = 0;
      for (int64_t chunk = lane; chunk < chunks; chunk += kWarpSize) {
        colsum += partials[(b * chunks + chunk) * C + k];
      }
      colsum = warp_sum(colsum);
      const scalar_t* cr = c + i * D;
      scalar_t* dcr = d_c + i * D;
      if constexpr (kSquared) {
        double norm = 0;
        for (int64_t j = lane; j < D; j += kWarpSize) {
          const acc_t cv = cr[j];
          norm += double(cv) * double(cv);
          dcr[j] = static_cast<scalar_t>(two_tau * (acc_t(dcr[j]) - colsum * cv));
        }
        term = -double(colsum) * warp_sum(norm);
      } else if constexpr (kDistance == Distance::kEuclidean) {  // tau (W^T Q - colsum(W) c)
        finish_row(dcr, cr, D, -colsum, t, lane);
      } else {  // tau (W^T Q + v c); term = c . (W^T Q)
        term = warp_dot(cr, dcr, D, lane);
        finish_row(dcr, cr, D, cosine_coefficient(term, cn[i]), t, lane);
      }
    }
    if (lane == 0) terms[r] = term;
  }
}

// Calls f(std::integral_constant<Distance, d>{}) for the distance d: one kernel
// instantiation per distance.
template <typename F>
void dispatch_distance(Distance distance, F&& f) {
  switch (distance) {
    case Distance::kEuclidean:
      return f(std::integral_constant<Distance, Distance::kEuclidean>{});
    case Distance::kCosine:
      return f(std::integral_constant<Distance, Distance::kCosine>{});
    default:
      return f(std::integral_constant<Distance, Distance::kSquaredEuclidean>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_forward_cuda(
    const at::Tensor& queries, const at::Tensor& prototypes, const at::Tensor& labels,
    const at::Tensor& tau, int64_t distance_code) {
  const EpisodeShape shape =
      check_cross_entropy_forward(c10::kCUDA, queries, prototypes, labels, tau, distance_code);
  const auto distance = static_cast<Distance>(distance_code);
  const int64_t B = shape.B, M = shape.M, C = shape.C;
  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor softmax = at::bmm(queries, prototypes.transpose(1, 2));  // Q C^T, then in place
  at::Tensor losses = at::empty({B, M}, queries.options());
  at::Tensor predictions = at::empty({B, M}, labels.options());
  const int64_t rows = B * M;
  if (rows == 0) return {losses, predictions, softmax};
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_cross_entropy_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor cn = row_squared_norms<scalar_t>(prototypes);
    const at::Tensor qn =
        distance == Distance::kSquaredEuclidean ? cn : row_squared_norms<scalar_t>(queries);
    if (distance == Distance::kEuclidean) {
      refine_squared_distances<scalar_t>(softmax, queries, prototypes, qn, cn);
    }
    dispatch_distance(distance, [&](auto kind) {
      ce_forward_kernel<decltype(kind)::value, scalar_t>
          <<<grid_blocks(rows, kWarpsPerBlock), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              softmax.mutable_data_ptr<scalar_t>(), qn.const_data_ptr<acc_t>(),
              cn.const_data_ptr<acc_t>(), labels.const_data_ptr<int64_t>(),
              tau.const_data_ptr<scalar_t>(), losses.mutable_data_ptr<scalar_t>(),
              predictions.mutable_data_ptr<int64_t>(), rows, M, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {losses, predictions, softmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& queries, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& tau, const at::Tensor& softmax,
    int64_t distance_code) {
  const EpisodeShape shape = check_cross_entropy_backward(
      c10::kCUDA, grad_losses, queries, prototypes, labels, tau, softmax, distance_code);
  const auto distance = static_cast<Distance>(distance_code);
  const int64_t B = shape.B, M = shape.M, C = shape.C, D = shape.D;
  const c10::cuda::CUDAGuard guard(queries.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t tiles = (C + kTileColumns - 1) / kTileColumns;
  at::Tensor d_queries, d_prototypes;
  at::Tensor d_tau = at::empty({}, queries.options());
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "prototypical_cross_entropy_backward_cuda",
                             [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = queries.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const bool squared = distance == Distance::kSquaredEuclidean;
    const bool euclidean = distance == Distance::kEuclidean;
    // the squared norms (not read for the squared distance) and the euclidean
    // distances' row partials
    const at::Tensor qn =
        squared ? at::empty({0}, acc_options) : row_squared_norms<scalar_t>(queries);
    const at::Tensor cn = squared ? qn : row_squared_norms<scalar_t>(prototypes);
    at::Tensor row_partials =
        at::empty({squared ? 0 : B * M * tiles * 2}, queries.options().dtype(at::kDouble));
    // the euclidean squared distances (Q C^T, refined) and G (W)
    at::Tensor dist = euclidean ? at::bmm(queries, prototypes.transpose(1, 2))
                                : at::empty({0}, queries.options());
    if (euclidean) refine_squared_distances<scalar_t>(dist, queries, prototypes, qn, cn);
    at::Tensor G = at::empty({B, M, C}, queries.options());
    at::Tensor partials = at::empty({B, chunks, C}, acc_options);
    dispatch_distance(distance, [&](auto kind) {
      constexpr Distance kDistance = decltype(kind)::value;
      if (G.numel() > 0) {
        const dim3 grid(grid_blocks(B * chunks, 1), grid_blocks(C, kTileColumns, kMaxGridY));
        grad_logits_kernel<kDistance, scalar_t>
            <<<grid, dim3(kTileColumns, kRowGroups), 0, stream>>>(
                softmax.const_data_ptr<scalar_t>(), grad_losses.const_data_ptr<scalar_t>(),
                labels.const_data_ptr<int64_t>(), qn.const_data_ptr<acc_t>(),
                cn.const_data_ptr<acc_t>(), dist.const_data_ptr<scalar_t>(),
                G.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(),
                row_partials.mutable_data_ptr<double>(), B, M, C, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      d_queries = at::bmm(G, prototypes);                  // G C, finished by the epilogue
      d_prototypes = at::bmm(G.transpose(1, 2), queries);  // G^T Q, finished by the epilogue
      const int64_t rows = B * M + B * C;
      at::Tensor terms = at::empty({rows}, queries.options().dtype(at::kDouble));
      if (rows > 0) {
        backward_epilogue_kernel<kDistance, scalar_t>
            <<<grid_blocks(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
                queries.const_data_ptr<scalar_t>(), prototypes.const_data_ptr<scalar_t>(),
                tau.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                partials.const_data_ptr<acc_t>(), row_partials.const_data_ptr<double>(),
                qn.const_data_ptr<acc_t>(), cn.const_data_ptr<acc_t>(),
                d_queries.mutable_data_ptr<scalar_t>(), d_prototypes.mutable_data_ptr<scalar_t>(),
                terms.mutable_data_ptr<double>(), B, M, C, D, chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      sum_to_scalar_kernel<scalar_t><<<1, kSumThreads, 0, stream>>>(
          terms.const_data_ptr<double>(), rows, 1.0, d_tau.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {d_queries, d_prototypes, d_tau};
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("prototypical_cross_entropy_forward", &prototypical_cross_entropy_forward_cuda);
  m.impl("prototypical_cross_entropy_backward", &prototypical_cross_entropy_backward_cuda);
}

}  // namespace fastmeta
