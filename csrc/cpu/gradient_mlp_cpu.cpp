// Coordinate-wise MLP on preprocessed gradients (Meta Networks' m and d), CPU
// (docs/kernel-math.md section 3; math in fastmeta/ops/gradient_mlp.py).
//
// Every coordinate is independent: u = preprocess(g) (2 values), s = W1 u + b1 (H),
// y = w2 . relu(s) + b2. The hidden layer lives in registers; the backward
// recomputes it. Parameter gradients are sums over all coordinates: each fixed
// chunk of kChunk coordinates sums into its own row of partials (double), then the
// rows are added in order, so the result is the same on any number of threads.
//
// The Python op checks arguments and gives users the error messages; these kernels
// check them again (checks.h) so that a direct call never indexes out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "gradient_preprocess.h"

namespace fastmeta {
namespace {

constexpr int64_t kChunk = 4096;  // coordinates per task (and per row of partials)

// The MLP's parameters (w1 [H, 2], b1 [H], w2 [H]) and the preprocessing.
template <typename T>
struct Mlp {
  const T* w1;
  const T* b1;
  const T* w2;
  int64_t hidden;
  Preprocessing<T> preprocess;

  Mlp(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_, double p)
      : w1(w1_.const_data_ptr<T>()), b1(b1_.const_data_ptr<T>()), w2(w2_.const_data_ptr<T>()),
        hidden(w1_.size(0)), preprocess(p) {}

  // Pre-activation s_k of hidden unit k.
  T hidden_input(const Preprocessed<T>& u, int64_t k) const {
    return w1[2 * k] * u.u0 + w1[2 * k + 1] * u.u1 + b1[k];
  }
};

// grads (any shape), w1 [H, 2], b1 [H], w2 [H] and `other` (b2 [] or grad_out shaped
// like grads, checked by the caller): floating, of one dtype, on the CPU; p finite > 0.
void check_parameters(const char* op, const at::Tensor& grads, const at::Tensor& w1,
                      const at::Tensor& b1, const at::Tensor& w2, const Arg& other, double p) {
  check_tensor(op, "grads", grads, kAnyDim, kFloating);
  check_tensor(op, "w1", w1, 2, kFloating);
  check_tensor(op, "b1", b1, 1, kFloating);
  check_tensor(op, "w2", w2, 1, kFloating);
  check_same_dtype(op, {{"grads", grads}, {"w1", w1}, {"b1", b1}, {"w2", w2}, other});
  const int64_t H = w1.size(0);
  check_size(op, "w1", w1, 1, 2, "the MLP's input size");
  check_size(op, "b1", b1, 0, H, "H of w1");
  check_size(op, "w2", w2, 0, H, "H of w1");
  TORCH_CHECK(p > 0 && std::isfinite(p), op, ": p must be a finite number > 0, got ", p);
  check_same_device(op, c10::kCPU, {{"grads", grads}, {"w1", w1}, {"b1", b1}, {"w2", w2}, other});
}

}  // namespace

// y = w2 . relu(w1 u(g) + b1) + b2 for every element g of grads (any shape), with
// u(g) the (log|g|/p, sign g) / (-1, e^p g) preprocessing. w1 [H, 2], b1 [H],
// w2 [H], b2 [].
at::Tensor gradient_mlp_forward_cpu(const at::Tensor& grads, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2, double p) {
  check_tensor("gradient_mlp_forward", "b2", b2, 0, kFloating);
  check_parameters("gradient_mlp_forward", grads, w1, b1, w2, {"b2", b2}, p);
  at::Tensor out = at::empty_like(grads);
  const int64_t n = grads.numel();
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_mlp_forward_cpu", [&] {
    using T = scalar_t;
    const Mlp<T> mlp(w1, b1, w2, p);
    const T* g = grads.const_data_ptr<T>();
    const T bias2 = *b2.const_data_ptr<T>();  // a CPU read, not a sync
    T* y = out.mutable_data_ptr<T>();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Preprocessed<T> u = mlp.preprocess(g[i]);
        T acc = bias2;
        for (int64_t k = 0; k < mlp.hidden; ++k) {
          const T s = mlp.hidden_input(u, k);
          // w2 . relu(s) as torch's matmul: NaN propagates, and a closed unit adds
          // w2 * 0 (NaN for an infinite w2).
          acc += mlp.w2[k] * (!(s <= T(0)) ? s : T(0));
        }
        y[i] = acc;
      }
    });
  });
  return out;
}

// (d_grads (empty unless need_grads), d_w1, d_b1, d_w2, d_b2); the parameter
// gradients are summed per fixed chunk of coordinates in double, then the chunks in
// order, so results do not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_mlp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grads, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, double p, bool need_grads) {
  const char* op = "gradient_mlp_backward";
  check_tensor(op, "grad_out", grad_out, kAnyDim, kFloating);
  check_parameters(op, grads, w1, b1, w2, {"grad_out", grad_out}, p);
  check_shape(op, "grad_out", grad_out, grads.sizes(), "like grads");
  const int64_t n = grads.numel(), H = w1.size(0);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t row = 4 * H + 1;  // d_w1 (2H), d_b1 (H), d_w2 (H), d_b2 (1)
  std::vector<double> partials(chunks * row, 0.0);
  at::Tensor d_grads = need_grads ? at::empty_like(grads) : at::empty({0}, grads.options());
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "gradient_mlp_backward_cpu", [&] {
    using T = scalar_t;
    const Mlp<T> mlp(w1, b1, w2, p);
    const T* g = grads.const_data_ptr<T>();
    const T* dy = grad_out.const_data_ptr<T>();
    T* dg = need_grads ? d_grads.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        double* sums = partials.data() + c * row;
        double* d_w1 = sums;
        double* d_b1 = sums + 2 * H;
        double* d_w2 = sums + 3 * H;
        const int64_t end = std::min(n, (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < end; ++i) {
          const Preprocessed<T> u = mlp.preprocess(g[i]);
          const T d = dy[i];
          T du0 = 0, du1 = 0;
          for (int64_t k = 0; k < H; ++k) {
            // Every unit, a closed one with dh = 0 too: as the matmuls of the plain
            // form, 0 times an infinite u or w1 is NaN (relu's backward passes a NaN s).
            const T s = mlp.hidden_input(u, k);
            const bool closed = s <= T(0);
            const T dh = closed ? T(0) : d * mlp.w2[k];
            d_w2[k] += double(d * (closed ? T(0) : s));
            d_w1[2 * k] += double(dh * u.u0);
            d_w1[2 * k + 1] += double(dh * u.u1);
            d_b1[k] += double(dh);
            du0 += dh * mlp.w1[2 * k];
            du1 += dh * mlp.w1[2 * k + 1];
          }
          sums[4 * H] += double(d);
          if (dg != nullptr) dg[i] = u.backward(du0, du1);
        }
      }
    });
  });
  std::vector<double> total(row, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t r = 0; r < row; ++r) total[r] += partials[c * row + r];
  }
  const auto to_tensor = [&](int64_t offset, at::IntArrayRef shape) {
    at::Tensor t = at::empty(shape, w1.options().dtype(at::kDouble));
    std::copy(total.begin() + offset, total.begin() + offset + t.numel(),
              t.mutable_data_ptr<double>());
    return t.to(w1.scalar_type());
  };
  return {d_grads, to_tensor(0, {H, 2}), to_tensor(2 * H, {H}), to_tensor(3 * H, {H}),
          to_tensor(4 * H, {})};
}

TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def(
      "gradient_mlp_forward(Tensor grads, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float p) "
      "-> Tensor");
  m.def(
      "gradient_mlp_backward(Tensor grad_out, Tensor grads, Tensor w1, Tensor b1, Tensor w2, "
      "float p, bool need_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("gradient_mlp_forward", &gradient_mlp_forward_cpu);
  m.impl("gradient_mlp_backward", &gradient_mlp_backward_cpu);
}

}  // namespace fastmeta
