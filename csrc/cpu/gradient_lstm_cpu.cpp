// Coordinate-wise LSTM over the examples of each episode (Meta Networks' task-level
// generator d), CPU (docs/kernel-math.md section 3; math in fastmeta/ops/gradient_lstm.py).
//
// grads [B, N, Q...] (Q: the coordinates of one example): for every episode b and
// coordinate q, an LSTM of H units reads u(grads[b, t, q]) for t = 0 .. N-1 from a zero
// state; y[b, q] = w_out . h_N + b_out. Coordinates go in blocks of kLanes of one
// episode, whose states are small [H][kLanes] arrays (unit-major: the loops over lanes
// are the vector loops, the same weights serving every lane). The forward keeps only
// the current state; the backward recomputes a block's N steps (gates and states,
// about 6 H N kLanes values, in cache) and runs back through them. Parameter
// gradients are summed per lane in double over a chunk of kBlocksPerChunk blocks,
// then over the lanes into the chunk's row of partials, and the rows are added in
// order: the same result on any number of threads.
//
// No FP trap semantics in this file (results unchanged: no reassociation, no flush to
// zero), so that GCC if-converts vector_exp's selects and vectorizes the gates in the
// AVX2/AVX-512 clones (see vector_exp.h). The pragma comes before any code.
//
// The Python op checks arguments and gives users the error messages; these kernels
// check them again (checks.h) so that a direct call never indexes out of bounds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "gradient_preprocess.h"
#include "simd_clones.h"
#include "vector_exp.h"

namespace fastmeta {
namespace {

constexpr int64_t kLanes = 16;          // coordinates per block
constexpr int64_t kBlocksPerChunk = 64;  // blocks per task (and per row of partials)

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

  Lstm(const at::Tensor& w_ih_, const at::Tensor& w_hh_, const at::Tensor& b_,
       const at::Tensor& w_out_, double p)
      : w_ih(w_ih_.const_data_ptr<T>()), w_hh(w_hh_.const_data_ptr<T>()), b(b_.const_data_ptr<T>()),
        w_out(w_out_.const_data_ptr<T>()), H(w_hh_.size(1)), preprocess(p) {}
};

// grads [B, N, Q...] seen as [B, N, Q], in blocks of kLanes coordinates of one episode.
struct Layout {
  int64_t B, N, Q, blocks_per_episode, blocks, chunks;

  explicit Layout(const at::Tensor& grads)
      : B(grads.size(0)), N(grads.size(1)), Q(c10::multiply_integers(grads.sizes().slice(2))),
        blocks_per_episode((Q + kLanes - 1) / kLanes), blocks(B * blocks_per_episode),
        chunks((blocks + kBlocksPerChunk - 1) / kBlocksPerChunk) {}

  int64_t episode(int64_t block) const { return block / blocks_per_episode; }
  int64_t first(int64_t block) const { return (block % blocks_per_episode) * kLanes; }
  int64_t lanes(int64_t block) const { return std::min(kLanes, Q - first(block)); }
};

// One step for a block: inputs u0, u1 [kLanes], state h, c [H][kLanes] -> h_next,
// c_next [H][kLanes] and the activated gates [4H][kLanes]. The 4 gates of a unit are
// formed together, so each h[k] vector serves 4 rows of w_hh.
template <typename T>
FASTMETA_SIMD_CLONES void step(const Lstm<T>& m, const T* u0, const T* u1, const T* h, const T* c,
                               T* h_next, T* c_next, T* gates) {
  const int64_t H = m.H;
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
    const T bi = m.b[j], bf = m.b[H + j], bg = m.b[2 * H + j], bo = m.b[3 * H + j];
    for (int64_t l = 0; l < kLanes; ++l) {
      const T in = sigmoid(z[0][l] + bi), forget = sigmoid(z[1][l] + bf);
      const T cand = lstm_tanh(z[2][l] + bg), out = sigmoid(z[3][l] + bo);
      const T cell = forget * c[j * kLanes + l] + in * cand;
      c_next[j * kLanes + l] = cell;
      h_next[j * kLanes + l] = out * lstm_tanh(cell);
      gates[j * kLanes + l] = in;
      gates[(H + j) * kLanes + l] = forget;
      gates[(2 * H + j) * kLanes + l] = cand;
      gates[(3 * H + j) * kLanes + l] = out;
    }
  }
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

// Parameter gradients of a block, summed per lane in double: rows of kLanes for d_w_ih
// [4H, 2], d_w_hh [4H, H], d_b [4H], d_w_out [H], d_b_out.
struct Sums {
  int64_t w_ih, w_hh, b, w_out, b_out, rows;

  explicit Sums(int64_t H)
      : w_ih(0), w_hh(8 * H), b(8 * H + 4 * H * H), w_out(b + 4 * H), b_out(w_out + H),
        rows(b_out + 1) {}
};

// dz [4H][kLanes] of one step back (the module docstring's formulas, in the reference's
// order of operations) from dh and dc [H][kLanes], the step's gates [4H][kLanes] and
// cell states c_prev, c [H][kLanes]; dc <- dc f.
template <typename T>
FASTMETA_SIMD_CLONES void gate_gradients(int64_t H, const T* gates, const T* c_prev, const T* c,
                                         const T* dh, T* dc, T* dz) {
  const int64_t HL = H * kLanes;
  for (int64_t x = 0; x < HL; ++x) {
    const T in = gates[x], forget = gates[HL + x], cand = gates[2 * HL + x];
    const T out = gates[3 * HL + x];
    const T tau = lstm_tanh(c[x]);
    const T d_cell = dc[x] + dh[x] * out * (T(1) - tau * tau);
    dz[x] = d_cell * cand * in * (T(1) - in);
    dz[HL + x] = d_cell * c_prev[x] * forget * (T(1) - forget);
    dz[2 * HL + x] = d_cell * in * (T(1) - cand * cand);
    dz[3 * HL + x] = dh[x] * tau * out * (T(1) - out);
    dc[x] = d_cell * forget;
  }
}

// Per lane: d_b += dz, d_w_ih += dz u^T, d_w_hh += dz h_prev^T into acc [rows][kLanes].
template <typename T>
FASTMETA_SIMD_CLONES void accumulate(const Sums& sums, int64_t H, const T* dz, const T* u0,
                                     const T* u1, const T* h_prev, double* acc) {
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

// out [cols][kLanes] = w^T dz for a row-major w [rows, cols] and dz [rows][kLanes]:
// dh = W_hh^T dz, du = W_ih^T dz.
template <typename T>
FASTMETA_SIMD_CLONES void transposed_product(const T* w, const T* dz, int64_t rows, int64_t cols,
                                             T* out) {
  std::fill(out, out + cols * kLanes, T(0));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t k = 0; k < cols; ++k) {
      const T wk = w[row * cols + k];
      for (int64_t l = 0; l < kLanes; ++l) out[k * kLanes + l] += dz[row * kLanes + l] * wk;
    }
  }
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
        dz_(4 * m.H * kLanes), dh_(m.H * kLanes), dc_(m.H * kLanes), du_(2 * kLanes) {}

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
      gate_gradients(H, gates_.data() + t * 4 * HL, cs_.data() + t * HL, cs_.data() + (t + 1) * HL,
                     dh_.data(), dc_.data(), dz_.data());
      accumulate(sums_, H, dz_.data(), u, u + kLanes, hs_.data() + t * HL, acc);
      if (dg != nullptr) {
        transposed_product(m_.w_ih, dz_.data(), 4 * H, int64_t(2), du_.data());
        const Preprocessed<T>* slopes = slopes_.data() + t * kLanes;
        for (int64_t l = 0; l < lanes; ++l) {
          dg[t * Q + l] = slopes[l].backward(du_[l], du_[kLanes + l]);
        }
      }
      transposed_product(m_.w_hh, dz_.data(), 4 * H, H, dh_.data());
    }
  }

 private:
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
  std::vector<T> dz_, dh_, dc_, du_;
};

// grads [B, N, ...] (at least 2-D), w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H] and
// `other` (b_out [] or grad_out [B, ...], checked by the caller): floating, of one
// dtype, on the CPU; p finite > 0.
void check_parameters(const char* op, const at::Tensor& grads, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const at::Tensor& b, const at::Tensor& w_out,
                      const Arg& other, double p) {
  check_tensor(op, "grads", grads, kAnyDim, kFloating);
  TORCH_CHECK(grads.dim() >= 2, op, ": grads must be [B, N, ...], got ", describe(grads));
  check_tensor(op, "w_ih", w_ih, 2, kFloating);
  check_tensor(op, "w_hh", w_hh, 2, kFloating);
  check_tensor(op, "b", b, 1, kFloating);
  check_tensor(op, "w_out", w_out, 1, kFloating);
  check_same_dtype(
      op, {{"grads", grads}, {"w_ih", w_ih}, {"w_hh", w_hh}, {"b", b}, {"w_out", w_out}, other});
  const int64_t H = w_hh.size(1);
  check_size(op, "w_hh", w_hh, 0, 4 * H, "4 H of w_hh's H");
  check_size(op, "w_ih", w_ih, 0, 4 * H, "4 H of w_hh");
  check_size(op, "w_ih", w_ih, 1, 2, "the LSTM's input size");
  check_size(op, "b", b, 0, 4 * H, "4 H of w_hh");
  check_size(op, "w_out", w_out, 0, H, "H of w_hh");
  TORCH_CHECK(p > 0 && std::isfinite(p), op, ": p must be a finite number > 0, got ", p);
  check_same_device(
      op, c10::kCPU,
      {{"grads", grads}, {"w_ih", w_ih}, {"w_hh", w_hh}, {"b", b}, {"w_out", w_out}, other});
}

std::vector<int64_t> output_sizes(const at::Tensor& grads) {
  std::vector<int64_t> sizes(grads.sizes().begin(), grads.sizes().end());
  sizes.erase(sizes.begin() + 1);
  return sizes;
}

}  // namespace

// y [B, ...] = w_out . h_N + b_out of the LSTM over t of u(grads[b, t, ...]) for every
// coordinate; grads [B, N, ...], w_ih [4H, 2], w_hh [4H, H], b [4H], w_out [H], b_out [].
at::Tensor gradient_lstm_forward_cpu(const at::Tensor& grads, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const at::Tensor& b,
                                     const at::Tensor& w_out, const at::Tensor& b_out, double p) {
  const char* op = "gradient_lstm_forward";
  check_tensor(op, "b_out", b_out, 0, kFloating);
  check_parameters(op, grads, w_ih, w_hh, b, w_out, {"b_out", b_out}, p);
  at::Tensor out = at::empty(output_sizes(grads), grads.options());
  const Layout layout(grads);
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_lstm_forward_cpu", [&] {
    using T = scalar_t;
    const Lstm<T> m(w_ih, w_hh, b, w_out, p);
    const T* g = grads.const_data_ptr<T>();
    const T bias = *b_out.const_data_ptr<T>();  // a CPU read, not a sync
    T* y = out.mutable_data_ptr<T>();
    const int64_t HL = m.H * kLanes;
    at::parallel_for(0, layout.chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<T> scratch(8 * HL + 2 * kLanes);  // h, c, their next values, gates, u
      T* h = scratch.data();
      T* c = h + HL;
      T* h_next = c + HL;
      T* c_next = h_next + HL;
      T* gates = c_next + HL;
      T* u = gates + 4 * HL;
      const int64_t end = std::min(layout.blocks, last * kBlocksPerChunk);
      for (int64_t block = first * kBlocksPerChunk; block < end; ++block) {
        const int64_t e = layout.episode(block), q = layout.first(block);
        const int64_t lanes = layout.lanes(block);
        std::fill(h, h + HL, T(0));
        std::fill(c, c + HL, T(0));
        for (int64_t t = 0; t < layout.N; ++t) {
          block_inputs(m, g + (e * layout.N + t) * layout.Q + q, lanes, u, u + kLanes,
                       static_cast<Preprocessed<T>*>(nullptr));
          step(m, u, u + kLanes, h, c, h_next, c_next, gates);
          std::swap(h, h_next);
          std::swap(c, c_next);
        }
        for (int64_t l = 0; l < lanes; ++l) {
          T acc = T(0);
          for (int64_t j = 0; j < m.H; ++j) acc += h[j * kLanes + l] * m.w_out[j];
          y[e * layout.Q + q + l] = acc + bias;
        }
      }
    });
  });
  return out;
}

// (d_grads (empty unless need_grads), d_w_ih, d_w_hh, d_b, d_w_out, d_b_out); the
// parameter gradients are summed per fixed chunk of blocks in double, then the chunks
// in order, so results do not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gradient_lstm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grads,
                           const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b,
                           const at::Tensor& w_out, double p, bool need_grads) {
  const char* op = "gradient_lstm_backward";
  check_tensor(op, "grad_out", grad_out, kAnyDim, kFloating);
  check_parameters(op, grads, w_ih, w_hh, b, w_out, {"grad_out", grad_out}, p);
  check_shape(op, "grad_out", grad_out, output_sizes(grads), "[B, ...] like grads without N");
  const Layout layout(grads);
  const int64_t H = w_hh.size(1);
  const Sums sums(H);
  std::vector<double> partials(layout.chunks * sums.rows, 0.0);
  at::Tensor d_grads = need_grads ? at::empty_like(grads) : at::empty({0}, grads.options());
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_lstm_backward_cpu", [&] {
    using T = scalar_t;
    const Lstm<T> m(w_ih, w_hh, b, w_out, p);
    const T* g = grads.const_data_ptr<T>();
    const T* go = grad_out.const_data_ptr<T>();
    T* dg = need_grads ? d_grads.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, layout.chunks, 1, [&](int64_t first, int64_t last) {
      BlockBackward<T> backward(m, layout.N);
      const int64_t size = sums.rows * kLanes;
      std::vector<double> acc(size), partial(size);
      for (int64_t chunk = first; chunk < last; ++chunk) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const int64_t end = std::min(layout.blocks, (chunk + 1) * kBlocksPerChunk);
        for (int64_t block = chunk * kBlocksPerChunk; block < end; ++block) {
          const int64_t e = layout.episode(block), q = layout.first(block);
          const int64_t lanes = layout.lanes(block);
          T dy[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) dy[l] = l < lanes ? go[e * layout.Q + q + l] : T(0);
          const int64_t at = e * layout.N * layout.Q + q;
          T* block_dg = dg == nullptr ? nullptr : dg + at;
          if (lanes == kLanes) {
            backward.run(g + at, layout.Q, lanes, dy, acc.data(), block_dg);
            continue;
          }
          // A partial block: its padding lanes (which could hold NaN from 0 * inf
          // parameters) are left out of the sums.
          std::fill(partial.begin(), partial.end(), 0.0);
          backward.run(g + at, layout.Q, lanes, dy, partial.data(), block_dg);
          for (int64_t r = 0; r < sums.rows; ++r) {
            for (int64_t l = 0; l < lanes; ++l) acc[r * kLanes + l] += partial[r * kLanes + l];
          }
        }
        double* row = partials.data() + chunk * sums.rows;
        for (int64_t r = 0; r < sums.rows; ++r) {
          for (int64_t l = 0; l < kLanes; ++l) row[r] += acc[r * kLanes + l];
        }
      }
    });
  });
  std::vector<double> total(sums.rows, 0.0);
  for (int64_t chunk = 0; chunk < layout.chunks; ++chunk) {
    for (int64_t r = 0; r < sums.rows; ++r) total[r] += partials[chunk * sums.rows + r];
  }
  const auto to_tensor = [&](int64_t offset, at::IntArrayRef shape) {
    at::Tensor t = at::empty(shape, w_hh.options().dtype(at::kDouble));
    std::copy(total.begin() + offset, total.begin() + offset + t.numel(),
              t.mutable_data_ptr<double>());
    return t.to(w_hh.scalar_type());
  };
  return {d_grads,
          to_tensor(sums.w_ih, {4 * H, 2}),
          to_tensor(sums.w_hh, {4 * H, H}),
          to_tensor(sums.b, {4 * H}),
          to_tensor(sums.w_out, {H}),
          to_tensor(sums.b_out, {})};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def(
      "gradient_lstm_forward(Tensor grads, Tensor w_ih, Tensor w_hh, Tensor b, Tensor w_out, "
      "Tensor b_out, float p) -> Tensor");
  m.def(
      "gradient_lstm_backward(Tensor grad_out, Tensor grads, Tensor w_ih, Tensor w_hh, "
      "Tensor b, Tensor w_out, float p, bool need_grads) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("gradient_lstm_forward", &gradient_lstm_forward_cpu);
  m.impl("gradient_lstm_backward", &gradient_lstm_backward_cpu);
}

}  // namespace fastmeta
