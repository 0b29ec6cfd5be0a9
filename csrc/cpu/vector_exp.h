// exp written so that GCC vectorizes it (the C library's exp is a scalar call): float
// by Cody-Waite range reduction, x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r (Cephes' expf coefficients), then 2^n as two powers of two built
// from exponent bits (so n = 128, x up to 88.72, stays finite). Within about 1 ulp of
// std::exp on [-87.3, 88.7] (checked on a dense grid); 0 below, inf above, NaN for
// NaN. Branch-free: no input-dependent clamp before the polynomial, whose constant
// path the compiler would split off into a branch. Vectorizing it in GCC's
// target_clones needs no-trapping-math in the calling file (prototypical_cross_entropy_cpu.cpp
// sets it with a pragma), else GCC will not if-convert the selects.
// double uses std::exp.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "simd_clones.h"

namespace fastmeta {

FASTMETA_INLINE float vector_exp(float x) {
  const float t = x * 1.44269504088896341f;
  // n = round(t) (exact for |t| < 2^22), kept in [-127, 128]; NaN goes to -127.
  const float fn = std::min(128.0f, std::max(-127.0f, (t + 12582912.0f) - 12582912.0f));
  float r = x - fn * 0.693359375f;  // ln2 split in two for an exact product
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const int32_t n = int32_t(fn), half = n >> 1;  // 2^n = 2^half 2^(n - half), both normal
  const float two_half = std::bit_cast<float>(uint32_t(half + 127) << 23);
  const float two_rest = std::bit_cast<float>(uint32_t(n - half + 127) << 23);
  float result = x < -87.3365447505531f ? 0.0f : e_r * two_half * two_rest;
  result = x > 88.72283935546875f ? std::numeric_limits<float>::infinity() : result;
  return x != x ? x : result;
}

FASTMETA_INLINE double vector_exp(double x) { return std::exp(x); }

}  // namespace fastmeta
