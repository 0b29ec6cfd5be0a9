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

namespace fastmeta {

struct EpisodeShape {
  int64_t B, M, C, D;  // episodes, queries, classes (prototypes), embedding size
};

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

// queries, prototypes, labels [B, M] and tau [] of the forward.
EpisodeShape check_cross_entropy_forward(c10::DeviceType type, const at::Tensor& queries,
                                         const at::Tensor& prototypes, const at::Tensor& labels,
                                         const at::Tensor& tau);

// The forward's arguments, grad_losses [B, M] and the forward's softmax [B, M, C].
EpisodeShape check_cross_entropy_backward(c10::DeviceType type, const at::Tensor& grad_losses,
                                          const at::Tensor& queries, const at::Tensor& prototypes,
                                          const at::Tensor& labels, const at::Tensor& tau,
                                          const at::Tensor& softmax);

}  // namespace fastmeta
