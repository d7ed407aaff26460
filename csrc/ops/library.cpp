// The fused_optim operator library: the namespace is declared here, each algorithm's schemas
// and CPU / CUDA implementations live in its own csrc/ops/<algorithm>.cpp (TORCH_LIBRARY_FRAGMENT),
// so torch.ops.fused_optim.* dispatches on the tensors' device.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_optim, m) { (void)m; }

// fused_optim._C is imported for its side effect of registering the operators.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
