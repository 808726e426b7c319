// Kernels that check the CUDA simulator itself (compiled into pyrag._C_cudasim only): collectives compute what
// CUDA defines, and the faults the simulator promises to report -- deadlocks, shared-memory overruns, bad launch
// configurations, order-dependent results -- are reported. tests/test_cuda_sim.py runs them.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

// out[0] = sum of 0..n-1 over a block of n threads: warp shuffles, then the warps' sums through shared memory.
__global__ void block_sum_kernel(int64_t* out) {
  __shared__ int64_t partial[32];
  int64_t v = threadIdx.x;
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Per lane: ballot of odd lanes, match_any of lane / 4, shfl_up by 1 and shfl_down by 3 of the lane id.
__global__ void collectives_kernel(int64_t* out) {
  const int lane = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, lane & 1);
  const unsigned match = __match_any_sync(0xffffffffu, lane / 4);
  const int up = __shfl_up_sync(0xffffffffu, lane, 1);
  const int down = __shfl_down_sync(0xffffffffu, lane, 3);
  const int any = __any_sync(0xffffffffu, lane == 7), all = __all_sync(0xffffffffu, lane < 31);
  int64_t* o = out + threadIdx.x * 6;
  o[0] = ballot, o[1] = match, o[2] = up, o[3] = down, o[4] = any, o[5] = all;
}

// Lane 3 leaves before a full-warp shuffle the others wait in: a deadlock on a GPU.
__global__ void deadlock_kernel(int64_t* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Writes one float past the dynamic shared memory the launch asked for.
__global__ void smem_overrun_kernel(int64_t n) {
  extern __shared__ float buf[];
  if (threadIdx.x == 0) buf[n] = 1.0f;
}

// Thread 0 writes a shared flag that every thread reads without a barrier in between: a race whose outcome
// depends on the order threads run.
__global__ void race_kernel(int64_t* out) {
  __shared__ int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == blockDim.x - 1) flag = 1;
  out[threadIdx.x] = flag;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

namespace pyrag_sim {

void bind_selftests(void* module) {
  namespace py = pybind11;
  py::module_& m = *static_cast<py::module_*>(module);
  using P = std::uintptr_t;
  m.def("selftest", [](const std::string& name, P out_ptr, int64_t threads, int64_t smem) {
    auto* out = reinterpret_cast<int64_t*>(out_ptr);
    const unsigned nt = static_cast<unsigned>(threads);
    if (name == "block_sum") {
      block_sum_kernel<<<2, nt>>>(out);
    } else if (name == "collectives") {
      collectives_kernel<<<1, nt>>>(out);
    } else if (name == "deadlock") {
      deadlock_kernel<<<1, nt>>>(out);
    } else if (name == "smem_overrun") {
      smem_overrun_kernel<<<1, nt, static_cast<size_t>(smem)>>>(smem / 4);
    } else if (name == "smem_launch") {  // a legal kernel, launched with `smem` bytes and no attribute set
      smem_overrun_kernel<<<1, nt, static_cast<size_t>(smem)>>>(-1 + smem / 4);
    } else if (name == "race") {
      race_kernel<<<1, nt>>>(out);
    } else {
      throw std::invalid_argument("unknown self-test " + name);
    }
    check(cudaGetLastError(), name.c_str());
  });
}

}  // namespace pyrag_sim
