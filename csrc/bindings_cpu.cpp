// pybind11 bindings of the CPU module pyrag._C: the only file of this module that sees Python.
// Each op takes tensor addresses (tensor.data_ptr()) as integers, sizes and a dtype code; pyrag/ops/*.py
// has already checked shapes, dtypes and contiguity, and allocated every output. Kernels run without the GIL.
#include <pybind11/pybind11.h>

#include <omp.h>

#include "common.h"
// [ops: includes] one header per op, e.g. #include "rag_loss.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyrag CPU kernels (framework-free; called from pyrag.ops)";
  m.def("max_threads", [] { return omp_get_max_threads(); });
  // [ops: bindings] one block per op below, each owned by that op's files.
}
