// The Python module pystage._C: importing it registers the ops (TORCH_LIBRARY
// runs at load time); the module itself is empty. Built by setup.py only.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
