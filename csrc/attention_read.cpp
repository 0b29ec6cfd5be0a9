// Memory read fused with an augmented layer's fast branch (Meta Networks), for CPU
// and CUDA tensors alike: the work is GEMMs, so it goes through ATen's (MKL/OpenBLAS
// on CPU, cuBLAS on GPU). Math: docs/kernel-math.md section 3 and
// fastmeta/ops/attention_read.py. The Python op checks arguments and gives users the
// error messages; these kernels check them again (checks.h) so that a direct call
// errors clearly.
//
// Queries are taken in chunks of J per episode, J chosen so that the chunk's mixed
// weights W*_j = sum_i a_ji W*_i [J, O, K] stay within kChunkElements: the plain
// form holds all M of them ([B, M, O, K]) at once.
//   forward : mixed = a[j0:j1] @ W.view(N, O*K);  out[j0:j1] = x[j0:j1] @ mixed^T
//   backward: G = dout^T x [J, O*K];  d_a = G @ W^T;  d_W += a^T G;
//             d_x = dout @ mixed (mixed recomputed)
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"

namespace fastmeta {
namespace {

constexpr int64_t kChunkElements = 1 << 18;  // mixed weights per chunk: 1 MiB of float

struct Shape {
  int64_t B, M, N, O, K, L;
};

// attention [B, M, N], w [B, N, O, K], x [B, M, L, K]: contiguous, floating, of one
// dtype (their device is checked by the caller, with its other arguments).
Shape check_shapes(const char* op, const at::Tensor& attention, const at::Tensor& w,
                   const at::Tensor& x) {
  check_tensor(op, "attention", attention, 3, kFloatingOrHalf);
  check_tensor(op, "w", w, 4, kFloatingOrHalf);
  check_tensor(op, "x", x, 4, kFloatingOrHalf);
  check_same_dtype(op, {{"attention", attention}, {"w", w}, {"x", x}});
  const Shape s{attention.size(0), attention.size(1), attention.size(2),
                w.size(2),         w.size(3),         x.size(2)};
  check_size(op, "w", w, 0, s.B, "B of attention");
  check_size(op, "w", w, 1, s.N, "N of attention");
  check_size(op, "x", x, 0, s.B, "B of attention");
  check_size(op, "x", x, 1, s.M, "M of attention");
  check_size(op, "x", x, 3, s.K, "K of w");
  return s;
}

int64_t chunk_size(const Shape& s) {
  return std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.O * s.K, 1), 1,
                             std::max<int64_t>(s.M, 1));
}

}  // namespace

// out[b, j, l, o] = sum_i attention[b, j, i] sum_k w[b, i, o, k] x[b, j, l, k];
// attention [B, M, N], w [B, N, O, K], x [B, M, L, K] -> [B, M, L, O]. CPU and CUDA.
at::Tensor attention_read_forward(const at::Tensor& attention, const at::Tensor& w,
                                  const at::Tensor& x) {
  const char* op = "attention_read_forward";
  const Shape s = check_shapes(op, attention, w, x);
  // One device, of any type: the work is ATen ops (the kernel is registered for CPU and CUDA).
  check_same_device(op, attention.device().type(), {{"attention", attention}, {"w", w}, {"x", x}});
  at::Tensor out = at::empty({s.B, s.M, s.L, s.O}, x.options());
  const at::Tensor w_flat = w.view({s.B, s.N, s.O * s.K});
  const int64_t J = chunk_size(s);
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t j0 = 0; j0 < s.M; j0 += J) {
      const int64_t n = std::min(J, s.M - j0);
      const at::Tensor mixed = at::mm(attention[b].narrow(0, j0, n), w_flat[b]).view({n, s.O, s.K});
      at::Tensor rows = out[b].narrow(0, j0, n);
      at::bmm_out(rows, x[b].narrow(0, j0, n), mixed.transpose(1, 2));
    }
  }
  return out;
}

// (d_attention, d_w, d_x); each is empty unless asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_read_backward(
    const at::Tensor& grad_out, const at::Tensor& attention, const at::Tensor& w,
    const at::Tensor& x, bool need_attention, bool need_w, bool need_x) {
  const char* op = "attention_read_backward";
  const Shape s = check_shapes(op, attention, w, x);
  check_tensor(op, "grad_out", grad_out, 4, kFloatingOrHalf);
  check_same_dtype(op, {{"x", x}, {"grad_out", grad_out}});
  check_shape(op, "grad_out", grad_out, {s.B, s.M, s.L, s.O}, "[B, M, L, O], the forward's output");
  check_same_device(op, grad_out.device().type(),
                    {{"grad_out", grad_out}, {"attention", attention}, {"w", w}, {"x", x}});
  const auto empty = [&] { return at::empty({0}, x.options()); };
  // L = 0: the output is empty, so d_attention and d_w are zeros (G = 0, and G W^T
  // or a^T G would make NaN of 0 * inf).
  at::Tensor d_attention = !need_attention ? empty()
                           : s.L > 0       ? at::empty({s.B, s.M, s.N}, x.options())
                                           : at::zeros({s.B, s.M, s.N}, x.options());
  at::Tensor d_w = need_w ? at::zeros({s.B, s.N, s.O, s.K}, x.options()) : empty();
  at::Tensor d_x = need_x ? at::empty({s.B, s.M, s.L, s.K}, x.options()) : empty();
  const at::Tensor w_flat = w.view({s.B, s.N, s.O * s.K});
  const int64_t J = chunk_size(s);
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t j0 = 0; j0 < s.M; j0 += J) {
      const int64_t n = std::min(J, s.M - j0);
      const at::Tensor dout = grad_out[b].narrow(0, j0, n);  // [n, L, O]
      const at::Tensor a = attention[b].narrow(0, j0, n);    // [n, N]
      if ((need_attention || need_w) && s.L > 0) {
        const at::Tensor g =
            at::bmm(dout.transpose(1, 2), x[b].narrow(0, j0, n)).view({n, s.O * s.K});
        if (need_attention) {
          at::Tensor rows = d_attention[b].narrow(0, j0, n);
          at::mm_out(rows, g, w_flat[b].t());
        }
        if (need_w) d_w[b].view({s.N, s.O * s.K}).addmm_(a.t(), g);
      }
      if (need_x) {
        const at::Tensor mixed = at::mm(a, w_flat[b]).view({n, s.O, s.K});
        at::Tensor rows = d_x[b].narrow(0, j0, n);
        at::bmm_out(rows, dout, mixed);
      }
    }
  }
  return {d_attention, d_w, d_x};
}

// The schema, then one implementation for both devices.
TORCH_LIBRARY_FRAGMENT(fastmeta_C, m) {
  m.def("attention_read_forward(Tensor attention, Tensor w, Tensor x) -> Tensor");
  m.def(
      "attention_read_backward(Tensor grad_out, Tensor attention, Tensor w, Tensor x, "
      "bool need_attention, bool need_w, bool need_x) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmeta_C, CPU, m) {
  m.impl("attention_read_forward", &attention_read_forward);
  m.impl("attention_read_backward", &attention_read_backward);
}

TORCH_LIBRARY_IMPL(fastmeta_C, CUDA, m) {
  m.impl("attention_read_forward", &attention_read_forward);
  m.impl("attention_read_backward", &attention_read_backward);
}

}  // namespace fastmeta
