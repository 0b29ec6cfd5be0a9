// The math of gradient_lstm's CPU kernels on one block of kLanes coordinates
// (csrc/cpu/gradient_lstm_cpu.cpp; math in fastmeta/ops/gradient_lstm.py): states
// and gates are [H][kLanes] / [4H][kLanes] arrays (unit-major), so every loop over
// the lanes is a vector loop with the same weights for all lanes. The transcendental
// functions run in loops of their own, which GCC vectorizes (vector_exp.h; the file
// including this one must disable FP trap semantics before including it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "gradient_preprocess.h"
#include "simd_clones.h"
#include "vector_exp.h"

// GCC's loop vectorizer would vectorize transposed_product over its rows (a reduction
// with shuffles, several times slower); without it, SLP vectorizes the lanes as in step.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTMETA_LANES_ONLY __attribute__((optimize("no-tree-loop-vectorize")))
#else
#define FASTMETA_LANES_ONLY
#endif

namespace fastmeta {
namespace lstm {

constexpr int64_t kLanes = 16;  // coordinates per block

FASTMETA_INLINE float sigmoid(float x) { return 1.0f / (1.0f + vector_exp(-x)); }
FASTMETA_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// tanh for float from vector_exp: (1 - e^-2|x|) / (1 + e^-2|x|) with x's sign, and
// below |x| = 1/4, where that cancels, its Taylor polynomial to x^9 (relative error
// under 1e-8). inf -> +-1, NaN -> NaN.
FASTMETA_INLINE float lstm_tanh(float x) {
  const float a = std::abs(x), x2 = x * x;
  const float e = vector_exp(-2.0f * a);
  const float large = (1.0f - e) / (1.0f + e);
  const float poly =
      a * (1.0f + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315 + x2 * (62.0f / 2835)))));
  return std::copysign(a < 0.25f ? poly : large, x);
}
FASTMETA_INLINE double lstm_tanh(double x) { return std::tanh(x); }

// The LSTM's parameters: w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H]; gates in
// torch's order (i, f, g, o), gate k of unit j at row k H + j.
template <typename T>
struct Lstm {
  const T* w_ih;
  const T* w_hh;
  const T* b;
  const T* w_out;
  int64_t H;
  Preprocessing<T> preprocess;
};

// One step for a block: inputs u0, u1 [kLanes], state h, c [H][kLanes] -> h_next,
// c_next [H][kLanes] and the activated gates [4H][kLanes]. The 4 gates of a unit are
// formed together, so each h[i] vector serves 4 rows of w_hh; the activations follow
// in loops of their own.
template <typename T>
FASTMETA_SIMD_CLONES void step(const Lstm<T>& m, const T* u0, const T* u1, const T* h, const T* c,
                               T* h_next, T* c_next, T* gates) {
  const int64_t H = m.H, HL = H * kLanes;
  for (int64_t j = 0; j < H; ++j) {
    T z[4][kLanes];
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t row = k * H + j;
      const T w0 = m.w_ih[2 * row], w1 = m.w_ih[2 * row + 1];
      for (int64_t l = 0; l < kLanes; ++l) z[k][l] = w0 * u0[l] + w1 * u1[l];
    }
    for (int64_t i = 0; i < H; ++i) {
      const T* hi = h + i * kLanes;
      const T wi = m.w_hh[j * H + i], wf = m.w_hh[(H + j) * H + i];
      const T wg = m.w_hh[(2 * H + j) * H + i], wo = m.w_hh[(3 * H + j) * H + i];
      for (int64_t l = 0; l < kLanes; ++l) {
        z[0][l] += wi * hi[l];
        z[1][l] += wf * hi[l];
        z[2][l] += wg * hi[l];
        z[3][l] += wo * hi[l];
      }
    }
    for (int64_t k = 0; k < 4; ++k) {
      const T bias = m.b[k * H + j];
      T* row = gates + (k * H + j) * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) row[l] = z[k][l] + bias;
    }
  }
  for (int64_t x = 0; x < 2 * HL; ++x) gates[x] = sigmoid(gates[x]);  // i, f
  for (int64_t x = 2 * HL; x < 3 * HL; ++x) gates[x] = lstm_tanh(gates[x]);  // g
  for (int64_t x = 3 * HL; x < 4 * HL; ++x) gates[x] = sigmoid(gates[x]);  // o
  for (int64_t x = 0; x < HL; ++x) c_next[x] = gates[HL + x] * c[x] + gates[x] * gates[2 * HL + x];
  for (int64_t x = 0; x < HL; ++x) h_next[x] = lstm_tanh(c_next[x]);
  for (int64_t x = 0; x < HL; ++x) h_next[x] = gates[3 * HL + x] * h_next[x];
}

// The inputs of step t of a block: u0, u1 [kLanes] (lanes past `lanes`: g = 0) and,
// when `slopes` is given, the preprocessing of each lane for its backward.
template <typename T>
void block_inputs(const Lstm<T>& m, const T* g, int64_t lanes, T* u0, T* u1,
                  Preprocessed<T>* slopes) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const Preprocessed<T> u = m.preprocess(l < lanes ? g[l] : T(0));
    u0[l] = u.u0;
    u1[l] = u.u1;
    if (slopes != nullptr) slopes[l] = u;
  }
}

// Where each parameter gradient sits in rows of per-lane sums: rows of kLanes for d_w_ih
// [4H, 2], d_w_hh [4H, H], d_b [4H], d_w_out [H], d_b_out.
struct Sums {
  int64_t w_ih, w_hh, b, w_out, b_out, rows;

  explicit Sums(int64_t H)
      : w_ih(0), w_hh(8 * H), b(8 * H + 4 * H * H), w_out(b + 4 * H), b_out(w_out + H),
        rows(b_out + 1) {}
};

// dz [4H][kLanes] of one step back (the module docstring's formulas, in the
// reference's order of operations) from dh and dc [H][kLanes], the step's gates
// [4H][kLanes], c_prev [H][kLanes] and tau = tanh(c_t) [H][kLanes]; dc <- dc f.
template <typename T>
FASTMETA_SIMD_CLONES void gate_gradients(int64_t H, const T* gates, const T* c_prev, const T* tau,
                                         const T* dh, T* dc, T* dz) {
  const int64_t HL = H * kLanes;
  for (int64_t x = 0; x < HL; ++x) {
    const T in = gates[x], forget = gates[HL + x], cand = gates[2 * HL + x];
    const T out = gates[3 * HL + x];
    const T d_cell = dc[x] + dh[x] * out * (T(1) - tau[x] * tau[x]);
    dz[x] = d_cell * cand * in * (T(1) - in);
    dz[HL + x] = d_cell * c_prev[x] * forget * (T(1) - forget);
    dz[2 * HL + x] = d_cell * in * (T(1) - cand * cand);
    dz[3 * HL + x] = dh[x] * tau[x] * out * (T(1) - out);
    dc[x] = d_cell * forget;
  }
}

// out [n] = tanh(c [n]).
template <typename T>
FASTMETA_SIMD_CLONES void tanh_of(const T* c, int64_t n, T* out) {
  for (int64_t x = 0; x < n; ++x) out[x] = lstm_tanh(c[x]);
}

// Per lane, in double: d_b += dz, d_w_ih += dz u^T, d_w_hh += dz h_prev^T into acc
// [rows][kLanes].
template <typename T>
FASTMETA_SIMD_CLONES void accumulate(const Sums& sums, int64_t H, const T* __restrict dz,
                                     const T* __restrict u0, const T* __restrict u1,
                                     const T* __restrict h_prev, double* __restrict acc) {
  for (int64_t row = 0; row < 4 * H; ++row) {
    const T* d = dz + row * kLanes;
    double* w_ih = acc + (sums.w_ih + 2 * row) * kLanes;
    double* b = acc + (sums.b + row) * kLanes;
    double* w_hh = acc + (sums.w_hh + row * H) * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      b[l] += double(d[l]);
      w_ih[l] += double(d[l] * u0[l]);
      w_ih[kLanes + l] += double(d[l] * u1[l]);
    }
    for (int64_t k = 0; k < H; ++k) {
      for (int64_t l = 0; l < kLanes; ++l) {
        w_hh[k * kLanes + l] += double(d[l] * h_prev[k * kLanes + l]);
      }
    }
  }
}

// out [cols][kLanes] = w^T dz for dz [rows][kLanes], given w^T as a row-major
// wt [cols, rows]: dh = W_hh^T dz, du = W_ih^T dz. Output rows are summed in
// registers, kColumns at a time (as step's 4 gates: with fewer accumulators GCC would
// vectorize over the rows instead of the lanes).
template <int64_t kColumns, typename T>
FASTMETA_INLINE void transposed_columns(const T* wt, const T* dz, int64_t rows, T* out) {
  T sum[kColumns][kLanes] = {};
  for (int64_t row = 0; row < rows; ++row) {
    const T* d = dz + row * kLanes;
    T w[kColumns];
    for (int64_t k = 0; k < kColumns; ++k) w[k] = wt[k * rows + row];
    for (int64_t k = 0; k < kColumns; ++k) {
      for (int64_t l = 0; l < kLanes; ++l) sum[k][l] += d[l] * w[k];
    }
  }
  std::copy(&sum[0][0], &sum[0][0] + kColumns * kLanes, out);
}

template <typename T>
FASTMETA_LANES_ONLY FASTMETA_SIMD_CLONES void transposed_product(const T* wt, const T* dz,
                                                                 int64_t rows, int64_t cols,
                                                                 T* out) {
  int64_t k = 0;
  for (; k + 4 <= cols; k += 4) transposed_columns<4>(wt + k * rows, dz, rows, out + k * kLanes);
  for (; k + 2 <= cols; k += 2) transposed_columns<2>(wt + k * rows, dz, rows, out + k * kLanes);
  for (; k < cols; ++k) transposed_columns<1>(wt + k * rows, dz, rows, out + k * kLanes);
}

// One block's backward: recomputes its N steps (states and gates), then runs back
// through them, adding the parameter gradients into acc [rows][kLanes] and, when dg is
// given, storing d_grads of its valid lanes (g and dg point at [b, 0, first]; a step
// is Q further).
template <typename T>
class BlockBackward {
 public:
  BlockBackward(const Lstm<T>& m, int64_t N)
      : m_(m), N_(N), sums_(m.H), hs_((N + 1) * m.H * kLanes), cs_(hs_.size()),
        gates_(N * 4 * m.H * kLanes), u_(N * 2 * kLanes), slopes_(N * kLanes),
        dz_(4 * m.H * kLanes), dh_(m.H * kLanes), dc_(m.H * kLanes), tau_(m.H * kLanes),
        du_(2 * kLanes), w_ih_t_(transposed(m.w_ih, 4 * m.H, 2)),
        w_hh_t_(transposed(m.w_hh, 4 * m.H, m.H)) {}

  void run(const T* g, int64_t Q, int64_t lanes, const T* dy, double* acc, T* dg) {
    forward(g, Q, lanes);
    const int64_t H = m_.H, HL = H * kLanes;
    const T* h_last = hs_.data() + N_ * HL;
    for (int64_t l = 0; l < kLanes; ++l) acc[sums_.b_out * kLanes + l] += double(dy[l]);
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t l = 0; l < kLanes; ++l) {
        acc[(sums_.w_out + j) * kLanes + l] += double(dy[l] * h_last[j * kLanes + l]);
        dh_[j * kLanes + l] = dy[l] * m_.w_out[j];
      }
    }
    std::fill(dc_.begin(), dc_.end(), T(0));
    for (int64_t t = N_ - 1; t >= 0; --t) {
      const T* u = u_.data() + t * 2 * kLanes;
      tanh_of(cs_.data() + (t + 1) * HL, HL, tau_.data());
      gate_gradients(H, gates_.data() + t * 4 * HL, cs_.data() + t * HL, tau_.data(), dh_.data(),
                     dc_.data(), dz_.data());
      accumulate(sums_, H, dz_.data(), u, u + kLanes, hs_.data() + t * HL, acc);
      if (dg != nullptr) {
        transposed_product(w_ih_t_.data(), dz_.data(), 4 * H, int64_t(2), du_.data());
        const Preprocessed<T>* slopes = slopes_.data() + t * kLanes;
        for (int64_t l = 0; l < lanes; ++l) {
          dg[t * Q + l] = slopes[l].backward(du_[l], du_[kLanes + l]);
        }
      }
      transposed_product(w_hh_t_.data(), dz_.data(), 4 * H, H, dh_.data());
    }
  }

 private:
  static std::vector<T> transposed(const T* w, int64_t rows, int64_t cols) {
    std::vector<T> t(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < cols; ++k) t[k * rows + r] = w[r * cols + k];
    }
    return t;
  }

  void forward(const T* g, int64_t Q, int64_t lanes) {
    const int64_t HL = m_.H * kLanes;
    std::fill(hs_.begin(), hs_.begin() + HL, T(0));
    std::fill(cs_.begin(), cs_.begin() + HL, T(0));
    for (int64_t t = 0; t < N_; ++t) {
      T* u = u_.data() + t * 2 * kLanes;
      block_inputs(m_, g + t * Q, lanes, u, u + kLanes, slopes_.data() + t * kLanes);
      step(m_, u, u + kLanes, hs_.data() + t * HL, cs_.data() + t * HL, hs_.data() + (t + 1) * HL,
           cs_.data() + (t + 1) * HL, gates_.data() + t * 4 * HL);
    }
  }

  const Lstm<T>& m_;
  const int64_t N_;
  const Sums sums_;
  std::vector<T> hs_, cs_, gates_, u_;  // u_: [N][2][kLanes]
  std::vector<Preprocessed<T>> slopes_;
  std::vector<T> dz_, dh_, dc_, tau_, du_;
  std::vector<T> w_ih_t_, w_hh_t_;  // [2, 4H], [H, 4H]
};

}  // namespace lstm
}  // namespace fastmeta
