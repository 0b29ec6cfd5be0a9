// Prototypical Networks kernels (docs/kernel-math.md section 1): what the CPU and CUDA
// kernels share, their entry guards (checks.h).
//
// Shapes: support [B, S, D], labels [B, S] (int64, in [0, C)), queries [B, M, D],
// prototypes [B, C, D], query labels [B, M], tau a 0-d tensor; all floating tensors of
// one dtype (float or double), everything contiguous on one device. `type` is the
// device type of the calling kernel (kCPU or kCUDA). The label values are checked by
// the kernels themselves (CPU) or never indexed when out of range (CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <type_traits>

namespace fastmeta {

struct EpisodeShape {
  int64_t B, M, C, D;  // episodes, queries, classes (prototypes), embedding size
};

// The distance of the prototypical cross-entropy's logits z = tau f, each a function of
// dot = q . c, a = ||q||^2 and b = ||c||^2 (fastmeta/ops/prototypical_cross_entropy.py,
// whose DISTANCES lists the names in this order):
//   kSquaredEuclidean  f = 2 dot - b               (-||q - c||^2 up to the row's -a)
//   kEuclidean         f = -sqrt(a + b - 2 dot)    (refined where it cancels: kRefine)
//   kCosine            f = dot / (max(sqrt a, eps) max(sqrt b, eps)), eps = kCosineEps
enum class Distance : int64_t { kSquaredEuclidean = 0, kEuclidean = 1, kCosine = 2 };
inline constexpr double kCosineEps = 1e-8;

// a + b - 2 dot cancels where it is at most kRefine (a + b) (nearly identical points):
// there squared_distances and the euclidean distance recompute sum_j (q_j - c_j)^2.
template <typename scalar_t>
inline constexpr double kRefine = std::is_same_v<scalar_t, double> ? 1e-6 : 1e-2;

// queries [B, M, D] and prototypes [B, C, D]; `op` names the kernel in the messages.
EpisodeShape check_queries_prototypes(const char* op, c10::DeviceType type,
                                      const at::Tensor& queries, const at::Tensor& prototypes);

// support [B, S, D], labels [B, S], 0 <= num_classes, and num_classes <= S when B > 0
// (each class needs an example; this bounds the kernels' [B, C] class counts).
void check_class_prototypes_forward(c10::DeviceType type, const at::Tensor& support,
                                    const at::Tensor& labels, int64_t num_classes);

// grad [B, C, D] and labels [B, S], C <= S when B > 0.
void check_class_prototypes_backward(c10::DeviceType type, const at::Tensor& grad,
                                     const at::Tensor& labels);

// queries, prototypes, labels [B, M], tau [] and the distance (a Distance's value) of
// the forward.
EpisodeShape check_cross_entropy_forward(c10::DeviceType type, const at::Tensor& queries,
                                         const at::Tensor& prototypes, const at::Tensor& labels,
                                         const at::Tensor& tau, int64_t distance);

// The forward's arguments, grad_losses [B, M] and the forward's softmax [B, M, C].
EpisodeShape check_cross_entropy_backward(c10::DeviceType type, const at::Tensor& grad_losses,
                                          const at::Tensor& queries, const at::Tensor& prototypes,
                                          const at::Tensor& labels, const at::Tensor& tau,
                                          const at::Tensor& softmax, int64_t distance);

}  // namespace fastmeta
