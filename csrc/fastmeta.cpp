// fastmeta._C: the compiled kernels.
//
// The kernels are registered as private operators in the `fastmeta_C` namespace,
// one schema each with a CPU and (when built with CUDA) a CUDA implementation, so
// the PyTorch dispatcher routes a call by device. The public, differentiable ops
// (`torch.ops.fastmeta.*`) are defined in Python (fastmeta/ops/) and call these.
#include <Python.h>
#include <torch/library.h>

#include "cpu/large_alloc.h"

// The namespace is declared here, once, with what belongs to no kernel. Each op's
// schema is written beside its CPU kernel (always compiled), in a
// TORCH_LIBRARY_FRAGMENT of csrc/cpu/<op>_cpu.cpp (csrc/attention_read.cpp for the
// device-generic attention_read); a CUDA kernel's file only adds TORCH_LIBRARY_IMPL.
TORCH_LIBRARY(fastmeta_C, m) {
  // Frees the CPU buffer pool's idle buffers (cpu/large_alloc.h); returns the bytes freed.
  m.def("empty_cpu_pool() -> int", &fastmeta::empty_cpu_pool);
}

// `import fastmeta._C` loads this library (and so runs every file's registrations).
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
