// The Python module pystage._C_cuda: importing it loads this library, whose
// TORCH_LIBRARY_IMPL (glue.cpp) registers the CUDA kernels; the module itself
// is empty. Built by setup.py only (CMake links glue.cpp without Python).
//
// Loading needs no GPU or driver: libcudart defers the driver until the first
// CUDA call, so pystage imports on any machine with a matching torch.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
