// The preprocessing of one loss-gradient coordinate g for Meta Networks' generators
// (Andrychowicz et al. 2016; fastmeta/ops/gradient_mlp.py, preprocess):
//   u(g) = (log|g| / p, sign g)   if |g| >= e^-p
//          (-1, e^p g)            otherwise
// and its backward: d_g from the gradient (du0, du1) w.r.t. u. Shared by the
// gradient_mlp and gradient_lstm kernels.
#pragma once

#include <cmath>

namespace fastmeta {

// The preprocessed inputs of g and their slope.
template <typename T>
struct Preprocessed {
  T u0, u1;
  bool small;  // |g| < e^-p: only u1 depends on g
  T du;        // du1/dg = e^p if small, else du0/dg = 1 / (p g)

  // d_g from (du0, du1). A select, not du0 d0 + du1 d1: an infinite du of the branch
  // not taken would make NaN of 0 * inf.
  T backward(T du0, T du1) const { return (small ? du1 : du0) * du; }
};

// The constants of the preprocessing for one p.
template <typename T>
struct Preprocessing {
  T p, threshold, e_p;  // p, e^-p, e^p

  explicit Preprocessing(double p_) : p(T(p_)), threshold(T(std::exp(-p_))), e_p(T(std::exp(p_))) {}

  Preprocessed<T> operator()(T g) const {
    const T magnitude = std::abs(g);
    if (magnitude < threshold) return {T(-1), e_p * g, true, e_p};
    return {std::log(magnitude) / p, T((g > 0) - (g < 0)), false, T(1) / (p * g)};
  }
};

}  // namespace fastmeta
