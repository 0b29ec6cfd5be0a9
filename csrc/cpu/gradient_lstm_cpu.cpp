// Coordinate-wise LSTM over the examples of each episode (Meta Networks' task-level
// generator d), CPU (docs/kernel-math.md section 3; math in fastmeta/ops/gradient_lstm.py).
//
// grads [B, N, Q...] (Q: the coordinates of one example): for every episode b and
// coordinate q, an LSTM of H units reads u(grads[b, t, q]) for t = 0 .. N-1 from a zero
// state; y[b, q] = w_out . h_N + b_out. Coordinates go in blocks of kLanes of one
// episode, whose states are small [H][kLanes] arrays (the block's math:
// gradient_lstm_block.h; here the op's entry points). The forward keeps only
// the current state; the backward recomputes a block's N steps (gates and states,
// about 6 H N kLanes values, in cache) and runs back through them. Parameter
// gradients are summed per lane in double over a chunk of kBlocksPerChunk blocks,
// then over the lanes into the chunk's row of partials, and the rows are added in
// order: the same result on any number of threads.
//
// No FP trap semantics in this file (results unchanged: no reassociation, no flush to
// zero), so that GCC if-converts vector_exp's selects and vectorizes the gates in the
// AVX2/AVX-512 clones (see vector_exp.h). The pragma comes before any code, the
// included block math too.
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
#include <vector>

#include "../checks.h"
#include "gradient_lstm_block.h"

namespace fastmeta {
namespace {

using lstm::BlockBackward;
using lstm::kLanes;
using lstm::Lstm;
using lstm::Sums;

constexpr int64_t kBlocksPerChunk = 64;  // blocks per task (and per row of partials)

template <typename T>
Lstm<T> parameters(const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b,
                   const at::Tensor& w_out, double p) {
  return {w_ih.const_data_ptr<T>(),
          w_hh.const_data_ptr<T>(),
          b.const_data_ptr<T>(),
          w_out.const_data_ptr<T>(),
          w_hh.size(1),
          Preprocessing<T>(p)};
}

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
    const Lstm<T> m = parameters<T>(w_ih, w_hh, b, w_out, p);
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
          lstm::block_inputs(m, g + (e * layout.N + t) * layout.Q + q, lanes, u, u + kLanes,
                             static_cast<Preprocessed<T>*>(nullptr));
          lstm::step(m, u, u + kLanes, h, c, h_next, c_next, gates);
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
    const Lstm<T> m = parameters<T>(w_ih, w_hh, b, w_out, p);
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
