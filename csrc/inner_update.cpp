// Entry guards shared by the CPU and CUDA inner-update kernels (inner_update.h).
#include "inner_update.h"

#include <c10/util/Exception.h>

#include "checks.h"

namespace fastmeta {
namespace {

// alpha [], [P] or [T, P] for g [T, P], and `other` (theta [P] or grad_out [T, P]; it
// and g are checked by the caller) of g's dtype, all on one device of `type`.
AlphaKind check_alpha_and_g(const char* op, c10::DeviceType type, const Arg& other,
                            const at::Tensor& alpha, const at::Tensor& g) {
  check_tensor(op, "alpha", alpha, kAnyDim, kFloatingOrHalf);
  check_same_dtype(op, {{"g", g}, other, {"alpha", alpha}});
  check_same_device(op, type, {{"g", g}, other, {"alpha", alpha}});
  if (alpha.dim() == 0) return AlphaKind::kScalar;
  if (alpha.dim() == 1 && alpha.size(0) == g.size(1)) return AlphaKind::kPerElement;
  TORCH_CHECK(alpha.sizes() == g.sizes(), op, ": alpha must be [], [P] = [", g.size(1),
              "] or [T, P] = ", g.sizes(), " for g, got ", describe(alpha));
  return AlphaKind::kPerTaskElement;
}

}  // namespace

AlphaKind check_inner_update_forward(c10::DeviceType type, const at::Tensor& theta,
                                     const at::Tensor& alpha, const at::Tensor& g) {
  const char* op = "inner_update_forward";
  check_tensor(op, "theta", theta, 1, kFloatingOrHalf);
  check_tensor(op, "g", g, 2, kFloatingOrHalf);
  check_size(op, "theta", theta, 0, g.size(1), "P of g");
  return check_alpha_and_g(op, type, {"theta", theta}, alpha, g);
}

AlphaKind check_inner_update_backward(c10::DeviceType type, const at::Tensor& grad_out,
                                      const at::Tensor& alpha, const at::Tensor& g) {
  const char* op = "inner_update_backward";
  check_tensor(op, "grad_out", grad_out, 2, kFloatingOrHalf);
  check_tensor(op, "g", g, 2, kFloatingOrHalf);
  check_shape(op, "grad_out", grad_out, g.sizes(), "[T, P] like g");
  return check_alpha_and_g(op, type, {"grad_out", grad_out}, alpha, g);
}

}  // namespace fastmeta
