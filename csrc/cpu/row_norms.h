// Squared L2 norms of the rows of a contiguous [B, N, D] tensor, accumulated in
// the op-math type: [B * N] (row_norms.cpp; float and double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <vector>

namespace fastmeta {

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> row_squared_norms(const at::Tensor& x);

}  // namespace fastmeta
