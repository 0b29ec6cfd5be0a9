// Batched inner-loop update, CPU kernels (at::parallel_for over OpenMP).
//
// Forward is one streaming pass over g [T, P]. Backward walks P in fixed chunks;
// inside a chunk it loops over the T tasks and keeps the column sums
// (d_theta and, for a [P] alpha, d_alpha) in a small buffer that stays in L1, so
// the reduction over T happens in one pass, in a fixed order (deterministic,
// whatever the thread count). A scalar d_alpha sums chunk totals in double.
// Large [T, P] outputs come from a buffer pool (large_alloc.h): a fresh 128 MiB
// allocation otherwise costs more in page faults than the kernel itself.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../inner_update.h"
#include "large_alloc.h"

namespace fastmeta {
namespace {

constexpr int64_t kForwardGrain = 1 << 15;  // elements per parallel_for task
// Columns per backward chunk: long runs per row for the hardware prefetcher (a
// 4 KiB run per row measured ~25% slower at T = 32), short enough that the column
// sums stay in L2 and that P = 1M still splits into tasks for every thread.
constexpr int64_t kColumns = 16384;

template <typename scalar_t>
void forward_rows(const scalar_t* theta, const scalar_t* alpha, AlphaKind kind, const scalar_t* g,
                  scalar_t* out, int64_t T, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a0 = kind == AlphaKind::kScalar ? acc_t(alpha[0]) : acc_t(0);
  at::parallel_for(0, T * P, kForwardGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t t = i / P, p0 = i - t * P;
      const int64_t n = std::min(P - p0, end - i);
      const scalar_t* gr = g + i;
      const scalar_t* th = theta + p0;
      scalar_t* o = out + i;
      if (kind == AlphaKind::kScalar) {
        for (int64_t j = 0; j < n; ++j) o[j] = acc_t(th[j]) - a0 * acc_t(gr[j]);
      } else {
        const scalar_t* a = alpha + (kind == AlphaKind::kPerElement ? p0 : i);
        for (int64_t j = 0; j < n; ++j) o[j] = acc_t(th[j]) - acc_t(a[j]) * acc_t(gr[j]);
      }
      i += n;
    }
  });
}

// One chunk of columns [p0, p0 + n): d_theta, d_g and d_alpha for those columns,
// in one pass over the chunk's T rows. sum_go and sum_g_go are caller-owned
// buffers of n values (the column sums). Returns the chunk's sum of g * go for a
// scalar alpha (0 otherwise) in double: it feeds a sum over all T * P elements.
template <typename scalar_t, AlphaKind kKind, bool kNeedG, bool kNeedAlpha>
double backward_chunk(const scalar_t* go, const scalar_t* alpha, const scalar_t* g,
                      scalar_t* d_theta, scalar_t* d_g, scalar_t* d_alpha, int64_t T, int64_t P,
                      int64_t p0, int64_t n, at::opmath_type<scalar_t>* sum_go,
                      at::opmath_type<scalar_t>* sum_g_go) {
  using acc_t = at::opmath_type<scalar_t>;
  std::fill(sum_go, sum_go + n, acc_t(0));
  std::fill(sum_g_go, sum_g_go + n, acc_t(0));
  const acc_t a0 = kKind == AlphaKind::kScalar ? acc_t(alpha[0]) : acc_t(0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * P + p0;
    const scalar_t* gor = go + row;
    // Pointers that a variant does not use are never formed (the tensors may be empty).
    const scalar_t* gr = kNeedAlpha ? g + row : nullptr;
    const scalar_t* a = kKind == AlphaKind::kScalar
                            ? nullptr
                            : alpha + (kKind == AlphaKind::kPerElement ? p0 : row);
    scalar_t* dgr = kNeedG ? d_g + row : nullptr;
    scalar_t* dar = kNeedAlpha && kKind == AlphaKind::kPerTaskElement ? d_alpha + row : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t go_j = gor[j];
      sum_go[j] += go_j;
      if constexpr (kNeedG) dgr[j] = -(kKind == AlphaKind::kScalar ? a0 : acc_t(a[j])) * go_j;
      if constexpr (kNeedAlpha) {
        const acc_t prod = acc_t(gr[j]) * go_j;
        if constexpr (kKind == AlphaKind::kPerTaskElement) dar[j] = -prod;
        else sum_g_go[j] += prod;
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) d_theta[p0 + j] = sum_go[j];
  double chunk_total = 0;
  if constexpr (kNeedAlpha && kKind == AlphaKind::kPerElement) {
    for (int64_t j = 0; j < n; ++j) d_alpha[p0 + j] = -sum_g_go[j];
  }
  if constexpr (kNeedAlpha && kKind == AlphaKind::kScalar) {
    for (int64_t j = 0; j < n; ++j) chunk_total += sum_g_go[j];
  }
  return chunk_total;
}

// Calls fn with alpha's kind and the two need flags as compile-time constants.
template <typename Fn>
void with_backward_variant(AlphaKind kind, bool need_g, bool need_alpha, Fn&& fn) {
  auto with_flags = [&](auto k) {
    auto with_alpha = [&](auto ng) {
      if (need_alpha) fn(k, ng, std::true_type{});
      else fn(k, ng, std::false_type{});
    };
    if (need_g) with_alpha(std::true_type{});
    else with_alpha(std::false_type{});
  };
  switch (kind) {
    case AlphaKind::kScalar:
      return with_flags(std::integral_constant<AlphaKind, AlphaKind::kScalar>{});
    case AlphaKind::kPerElement:
      return with_flags(std::integral_constant<AlphaKind, AlphaKind::kPerElement>{});
    case AlphaKind::kPerTaskElement:
      return with_flags(std::integral_constant<AlphaKind, AlphaKind::kPerTaskElement>{});
  }
}

}  // namespace

at::Tensor inner_update_forward_cpu(const at::Tensor& theta, const at::Tensor& alpha,
                                    const at::Tensor& g) {
  const AlphaKind kind = check_inner_update_forward(c10::kCPU, theta, alpha, g);
  at::Tensor out = empty_cpu_large(g.sizes(), g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "inner_update_forward_cpu", [&] {
    forward_rows<scalar_t>(theta.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(), kind,
                           g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                           g.size(0), g.size(1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> inner_update_backward_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& alpha,
                                                                         const at::Tensor& g,
                                                                         bool need_g,
                                                                         bool need_alpha) {
  const AlphaKind kind = check_inner_update_backward(c10::kCPU, grad_out, alpha, g);
  const int64_t T = g.size(0), P = g.size(1);
  at::Tensor d_theta = at::empty({P}, g.options());
  at::Tensor d_g = empty_cpu_large(need_g ? g.sizes() : at::IntArrayRef{0}, g.options());
  at::Tensor d_alpha =
      empty_cpu_large(need_alpha ? alpha.sizes() : at::IntArrayRef{0}, g.options());
  const int64_t num_chunks = (P + kColumns - 1) / kColumns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "inner_update_backward_cpu", [&] {
    std::vector<double> chunk_totals(num_chunks, 0.0);
    with_backward_variant(kind, need_g, need_alpha, [&](auto k, auto ng, auto na) {
      at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<at::opmath_type<scalar_t>> sums(2 * kColumns);
        for (int64_t c = begin; c < end; ++c) {
          const int64_t p0 = c * kColumns;
          chunk_totals[c] = backward_chunk<scalar_t, decltype(k)::value, decltype(ng)::value,
                                           decltype(na)::value>(
              grad_out.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
              g.const_data_ptr<scalar_t>(), d_theta.mutable_data_ptr<scalar_t>(),
              d_g.mutable_data_ptr<scalar_t>(), d_alpha.mutable_data_ptr<scalar_t>(), T, P, p0,
              std::min(kColumns, P - p0), sums.data(), sums.data() + kColumns);
        }
      });
    });
    if (need_alpha && kind == AlphaKind::kScalar) {
      double total = 0;
      for (double v : chunk_totals) total += v;  // fixed order: deterministic
      d_alpha.fill_(-total);
    }
  });
  return {d_theta, d_g, d_alpha};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def("inner_update_forward(Tensor theta, Tensor alpha, Tensor g) -> Tensor");
  m.def(
      "inner_update_backward(Tensor grad_out, Tensor alpha, Tensor g, bool need_g, "
      "bool need_alpha) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("inner_update_forward", &inner_update_forward_cpu);
  m.impl("inner_update_backward", &inner_update_backward_cpu);
}

}  // namespace fastmeta
