// Argument checks shared by the CPU and CUDA inner-update kernels.
#include "inner_update.h"

#include <c10/util/Exception.h>

namespace fastmeta {

AlphaKind check_inner_update(const at::Tensor& other, const at::Tensor& alpha,
                             const at::Tensor& g) {
  TORCH_CHECK(g.dim() == 2, "inner_update: g must be [T, P], got ", g.sizes());
  const bool other_ok =
      (other.dim() == 1 && other.size(0) == g.size(1)) || other.sizes() == g.sizes();
  TORCH_CHECK(other_ok, "inner_update: theta must be [P] and grad_out [T, P], with g ", g.sizes(),
              "; got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == g.scalar_type() && alpha.scalar_type() == g.scalar_type(),
              "inner_update: tensors must share a dtype, got ", other.scalar_type(), ", ",
              alpha.scalar_type(), ", ", g.scalar_type());
  TORCH_CHECK(other.device() == g.device() && alpha.device() == g.device(),
              "inner_update: tensors must be on one device");
  TORCH_CHECK(other.is_contiguous() && alpha.is_contiguous() && g.is_contiguous(),
              "inner_update: kernels take contiguous tensors");
  if (alpha.dim() == 0) return AlphaKind::kScalar;
  if (alpha.dim() == 1 && alpha.size(0) == g.size(1)) return AlphaKind::kPerElement;
  TORCH_CHECK(alpha.sizes() == g.sizes(),
              "inner_update: alpha must be a scalar, [P] or [T, P] = ", g.sizes(), ", got ",
              alpha.sizes());
  return AlphaKind::kPerTaskElement;
}

}  // namespace fastmeta
