// Entry guards shared by the CPU and CUDA Prototypical-Networks kernels (protonet.h).
#include "protonet.h"

#include <c10/util/Exception.h>

#include "checks.h"

namespace fastmeta {
namespace {

// C classes for labels [B, S]: 0 <= C <= S when B > 0 (every class needs an example).
void check_classes(const char* op, const char* what, int64_t C, int64_t B, int64_t S) {
  TORCH_CHECK(C >= 0 && (B == 0 || C <= S), op, ": ", what, " is ", C,
              " but must be in [0, S] for S = ", S,
              " support examples per episode (every class needs one)");
}

// queries [B, M, D] and prototypes [B, C, D], floating, of one dtype (no device check).
EpisodeShape check_episode_pair(const char* op, const at::Tensor& queries,
                                const at::Tensor& prototypes) {
  check_tensor(op, "queries", queries, 3, kFloating);
  check_tensor(op, "prototypes", prototypes, 3, kFloating);
  check_same_dtype(op, {{"queries", queries}, {"prototypes", prototypes}});
  check_size(op, "prototypes", prototypes, 0, queries.size(0), "B of queries");
  check_size(op, "prototypes", prototypes, 2, queries.size(2), "D of queries");
  return {queries.size(0), queries.size(1), prototypes.size(1), queries.size(2)};
}

// check_episode_pair, labels [B, M], tau [] of the queries' dtype and the distance (no
// device check).
EpisodeShape check_cross_entropy_args(const char* op, const at::Tensor& queries,
                                      const at::Tensor& prototypes, const at::Tensor& labels,
                                      const at::Tensor& tau, int64_t distance) {
  const EpisodeShape s = check_episode_pair(op, queries, prototypes);
  check_labels(op, "labels", labels, s.B, s.M);
  check_tensor(op, "tau", tau, 0, kFloating);
  check_same_dtype(op, {{"queries", queries}, {"tau", tau}});
  check_enum(op, "distance", distance, {"squared_euclidean (0)", "euclidean (1)", "cosine (2)"});
  return s;
}

}  // namespace

EpisodeShape check_queries_prototypes(const char* op, c10::DeviceType type,
                                      const at::Tensor& queries, const at::Tensor& prototypes) {
  const EpisodeShape s = check_episode_pair(op, queries, prototypes);
  check_same_device(op, type, {{"queries", queries}, {"prototypes", prototypes}});
  return s;
}

void check_class_prototypes_forward(c10::DeviceType type, const at::Tensor& support,
                                    const at::Tensor& labels, int64_t num_classes) {
  const char* op = "class_prototypes_forward";
  check_tensor(op, "support", support, 3, kFloating);
  const int64_t B = support.size(0), S = support.size(1);
  check_labels(op, "labels", labels, B, S);
  check_classes(op, "num_classes", num_classes, B, S);
  check_same_device(op, type, {{"support", support}, {"labels", labels}});
}

void check_class_prototypes_backward(c10::DeviceType type, const at::Tensor& grad,
                                     const at::Tensor& labels) {
  const char* op = "class_prototypes_backward";
  check_tensor(op, "grad", grad, 3, kFloating);
  check_tensor(op, "labels", labels, 2, kInt64);
  const int64_t B = grad.size(0), C = grad.size(1), S = labels.size(1);
  check_labels(op, "labels", labels, B, S);
  check_classes(op, "C (grad's dim 1)", C, B, S);
  check_same_device(op, type, {{"grad", grad}, {"labels", labels}});
}

EpisodeShape check_cross_entropy_forward(c10::DeviceType type, const at::Tensor& queries,
                                         const at::Tensor& prototypes, const at::Tensor& labels,
                                         const at::Tensor& tau, int64_t distance) {
  const char* op = "prototypical_cross_entropy_forward";
  const EpisodeShape s = check_cross_entropy_args(op, queries, prototypes, labels, tau, distance);
  check_same_device(
      op, type,
      {{"queries", queries}, {"prototypes", prototypes}, {"labels", labels}, {"tau", tau}});
  return s;
}

EpisodeShape check_cross_entropy_backward(c10::DeviceType type, const at::Tensor& grad_losses,
                                          const at::Tensor& queries, const at::Tensor& prototypes,
                                          const at::Tensor& labels, const at::Tensor& tau,
                                          const at::Tensor& softmax, int64_t distance) {
  const char* op = "prototypical_cross_entropy_backward";
  const EpisodeShape s = check_cross_entropy_args(op, queries, prototypes, labels, tau, distance);
  check_tensor(op, "grad_losses", grad_losses, 2, kFloating);
  check_tensor(op, "softmax", softmax, 3, kFloating);
  check_same_dtype(op, {{"queries", queries}, {"grad_losses", grad_losses}, {"softmax", softmax}});
  check_shape(op, "grad_losses", grad_losses, {s.B, s.M}, "[B, M] like labels");
  check_shape(op, "softmax", softmax, {s.B, s.M, s.C}, "[B, M, C], the forward's");
  check_same_device(op, type,
                    {{"queries", queries},
                     {"prototypes", prototypes},
                     {"labels", labels},
                     {"tau", tau},
                     {"grad_losses", grad_losses},
                     {"softmax", softmax}});
  return s;
}

}  // namespace fastmeta
