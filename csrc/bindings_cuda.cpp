// pybind11 bindings of the CUDA module pyrag._C_cuda. Same conventions as bindings_cpu.cpp, plus the
// caller's stream (torch.cuda.current_stream().cuda_stream) as an integer: kernels launch on it, never on 0.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
// [ops: includes]

namespace py = pybind11;

namespace {
cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyrag CUDA kernels (framework-free; called from pyrag.ops)";
  // Number of visible devices, 0 (not an exception) without a driver or GPU so import stays cheap and safe.
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return n;
  });
  (void)as_stream;
  // [ops: bindings] one block per op below, each owned by that op's files.
}
