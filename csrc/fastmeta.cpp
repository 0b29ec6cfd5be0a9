// fastmeta._C: the compiled kernels.
//
// The kernels are registered as private operators in the `fastmeta_C` namespace,
// one schema each with a CPU and (when built with CUDA) a CUDA implementation, so
// the PyTorch dispatcher routes a call by device. The public, differentiable ops
// (`torch.ops.fastmeta.*`) are defined in Python (fastmeta/ops/) and call these.
#include <Python.h>
#include <torch/library.h>

#include "cpu/large_alloc.h"

TORCH_LIBRARY(fastmeta_C, m) {
  m.def("inner_update_forward(Tensor theta, Tensor alpha, Tensor g) -> Tensor");
  m.def(
      "inner_update_backward(Tensor grad_out, Tensor alpha, Tensor g, bool need_g, "
      "bool need_alpha) -> (Tensor, Tensor, Tensor)");
  m.def("class_prototypes_forward(Tensor support, Tensor labels, int num_classes) -> Tensor");
  m.def("class_prototypes_backward(Tensor grad, Tensor labels) -> Tensor");
  m.def("squared_distances_forward(Tensor queries, Tensor prototypes) -> Tensor");
  m.def(
      "prototypical_cross_entropy_forward(Tensor queries, Tensor prototypes, Tensor labels, "
      "Tensor tau) -> (Tensor, Tensor, Tensor)");
  m.def(
      "prototypical_cross_entropy_backward(Tensor grad_losses, Tensor queries, Tensor prototypes, "
      "Tensor labels, Tensor tau, Tensor softmax) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_block_forward(Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, "
      "int pad_h, int pad_w, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "conv_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
      "Tensor gamma, Tensor beta, Tensor mean, Tensor rstd, Tensor window, Tensor c_max, "
      "int pad_h, int pad_w, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool_forward(Tensor c, Tensor gamma, Tensor beta, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool_backward(Tensor grad_out, Tensor c, Tensor gamma, Tensor beta, "
      "Tensor mean, Tensor rstd, Tensor window) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gradient_mlp_forward(Tensor grads, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float p) "
      "-> Tensor");
  m.def(
      "gradient_mlp_backward(Tensor grad_out, Tensor grads, Tensor w1, Tensor b1, Tensor w2, "
      "float p, bool need_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_read_forward(Tensor attention, Tensor w, Tensor x) -> Tensor");
  m.def(
      "attention_read_backward(Tensor grad_out, Tensor attention, Tensor w, Tensor x, "
      "bool need_attention, bool need_w, bool need_x) -> (Tensor, Tensor, Tensor)");
  m.def("empty_cpu_pool() -> int", &fastmeta::empty_cpu_pool);
}

// `import fastmeta._C` loads this library (and so runs the registrations above).
// WITH_CUDA tells Python whether the CUDA kernels were compiled in.
static struct PyModuleDef fastmeta_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "fastmeta compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastmeta_c_module);
  if (module == nullptr) return nullptr;
#ifdef FASTMETA_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
