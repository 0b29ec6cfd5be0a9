// Prototypical Networks kernels (docs/kernel-math.md section 1): what the CPU and CUDA
// kernels share (the shapes, the queries/prototypes check).
//
// Shapes: support [B, S, D], labels [B, S] (int64, in [0, C)), queries [B, M, D],
// prototypes [B, C, D], query labels [B, M], tau a 0-d tensor. The Python ops check
// arguments and give users the error messages; these kernels repeat cheap checks
// with TORCH_CHECK only so that they never index out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastmeta {

// TORCH_CHECKs that queries [B, M, D] and prototypes [B, C, D] are contiguous, on one
// device, of one dtype, and agree in B and D; `op` names the caller in the message.
void check_queries_prototypes(const char* op, const at::Tensor& queries,
                              const at::Tensor& prototypes);

}  // namespace fastmeta
