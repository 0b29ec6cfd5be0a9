// Prototypical Networks kernels (docs/kernel-math.md section 1).
//
// Shapes: support [B, S, D], labels [B, S] (int64, in [0, C)), queries [B, M, D],
// prototypes [B, C, D], query labels [B, M], tau a 0-d tensor. The Python ops check
// arguments and give users the error messages; these kernels repeat cheap checks
// with TORCH_CHECK only so that they never index out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace fastmeta {

// TORCH_CHECKs that queries [B, M, D] and prototypes [B, C, D] are contiguous, on one
// device, of one dtype, and agree in B and D; `op` names the caller in the message.
void check_queries_prototypes(const char* op, const at::Tensor& queries,
                              const at::Tensor& prototypes);

// prototypes[b, k] = mean of support[b, i] over the i with labels[b, i] == k.
at::Tensor class_prototypes_forward_cpu(const at::Tensor& support, const at::Tensor& labels,
                                        int64_t num_classes);
// d_support[b, i] = grad[b, labels[b, i]] / count[b, labels[b, i]].
at::Tensor class_prototypes_backward_cpu(const at::Tensor& grad, const at::Tensor& labels);
at::Tensor class_prototypes_forward_cuda(const at::Tensor& support, const at::Tensor& labels,
                                         int64_t num_classes);
at::Tensor class_prototypes_backward_cuda(const at::Tensor& grad, const at::Tensor& labels);

// ||q_m - c_k||^2 [B, M, C]: one GEMM plus a fused pass; entries where the GEMM
// form cancels (near-identical points) are recomputed directly, so identical
// points give exactly 0 and no entry is negative.
at::Tensor squared_distances_forward_cpu(const at::Tensor& queries,
                                         const at::Tensor& prototypes);
at::Tensor squared_distances_forward_cuda(const at::Tensor& queries,
                                          const at::Tensor& prototypes);

// Cross-entropy of the logits z = -tau ||q - c||^2 over the classes:
// returns (losses [B, M], predictions [B, M] int64, softmax [B, M, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_forward_cpu(
    const at::Tensor& queries, const at::Tensor& prototypes, const at::Tensor& labels,
    const at::Tensor& tau);
// Given grad_losses [B, M] and the forward's softmax: (d_queries, d_prototypes, d_tau).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_backward_cpu(
    const at::Tensor& grad_losses, const at::Tensor& queries, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& tau, const at::Tensor& softmax);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_forward_cuda(
    const at::Tensor& queries, const at::Tensor& prototypes, const at::Tensor& labels,
    const at::Tensor& tau);
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototypical_cross_entropy_backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& queries, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& tau, const at::Tensor& softmax);

}  // namespace fastmeta
