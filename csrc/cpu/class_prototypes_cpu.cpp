// Class prototypes (per-class means of support embeddings), CPU kernels.
//
// forward : one pass over support [B, S, D] adding each row into its class's
//           prototype (parallel over episodes and column blocks of D, so each
//           output element has one writer and a fixed summation order), then a
//           division by the class counts.
// backward: d_support[b, i] = grad[b, y_bi] / n[b, y_bi], parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../protonet.h"
#include "large_alloc.h"
#include "parallel_grain.h"

namespace fastmeta {
namespace {

constexpr int64_t kColumns = 256;  // D columns per forward task

// Class counts [B * C]; fails on a label out of range or an empty class.
std::vector<int64_t> class_counts(const at::Tensor& labels, int64_t C) {
  const int64_t B = labels.size(0), S = labels.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(B * C, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t k = y[b * S + i];
      TORCH_CHECK(k >= 0 && k < C, "class_prototypes: label ", k, " of episode ", b,
                  " is outside [0, ", C, ")");
      ++counts[b * C + k];
    }
    for (int64_t k = 0; k < C; ++k) {
      TORCH_CHECK(counts[b * C + k] > 0, "class_prototypes: class ", k, " of episode ", b,
                  " has no support example");
    }
  }
  return counts;
}

}  // namespace

// prototypes[b, k] = mean of support[b, i] over the i with labels[b, i] == k.
at::Tensor class_prototypes_forward_cpu(const at::Tensor& support, const at::Tensor& labels,
                                        int64_t num_classes) {
  check_class_prototypes_forward(c10::kCPU, support, labels, num_classes);
  const int64_t B = support.size(0), S = support.size(1), D = support.size(2);
  const int64_t C = num_classes;
  const std::vector<int64_t> counts = class_counts(labels, C);
  at::Tensor out = at::zeros({B, C, D}, support.options());
  const int64_t col_blocks = (D + kColumns - 1) / kColumns;
  AT_DISPATCH_FLOATING_TYPES(support.scalar_type(), "class_prototypes_forward_cpu", [&] {
    const scalar_t* x = support.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * col_blocks, grain_for(S * std::min(D, kColumns)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / col_blocks, d0 = (task % col_blocks) * kColumns;
        const int64_t n = std::min(kColumns, D - d0);
        for (int64_t i = 0; i < S; ++i) {
          const scalar_t* row = x + (b * S + i) * D + d0;
          scalar_t* proto = p + (b * C + y[b * S + i]) * D + d0;
          for (int64_t j = 0; j < n; ++j) proto[j] += row[j];
        }
        for (int64_t k = 0; k < C; ++k) {
          scalar_t* proto = p + (b * C + k) * D + d0;
          const scalar_t count = scalar_t(counts[b * C + k]);
          for (int64_t j = 0; j < n; ++j) proto[j] /= count;
        }
      }
    });
  });
  return out;
}

// d_support[b, i] = grad[b, labels[b, i]] / count[b, labels[b, i]].
at::Tensor class_prototypes_backward_cpu(const at::Tensor& grad, const at::Tensor& labels) {
  check_class_prototypes_backward(c10::kCPU, grad, labels);
  const int64_t B = grad.size(0), C = grad.size(1), D = grad.size(2), S = labels.size(1);
  const std::vector<int64_t> counts = class_counts(labels, C);
  at::Tensor d_support = empty_cpu_large({B, S, D}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "class_prototypes_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    scalar_t* ds = d_support.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * S, grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / S, k = y[r];
        const scalar_t count = scalar_t(counts[b * C + k]);
        const scalar_t* src = g + (b * C + k) * D;
        scalar_t* dst = ds + r * D;
        for (int64_t j = 0; j < D; ++j) dst[j] = src[j] / count;
      }
    });
  });
  return d_support;
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def("class_prototypes_forward(Tensor support, Tensor labels, int num_classes) -> Tensor");
  m.def("class_prototypes_backward(Tensor grad, Tensor labels) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("class_prototypes_forward", &class_prototypes_forward_cpu);
  m.impl("class_prototypes_backward", &class_prototypes_backward_cpu);
}

}  // namespace fastmeta
