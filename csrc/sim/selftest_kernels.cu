// Kernels that check the CUDA simulator itself (compiled into pyrag._C_cudasim only): collectives compute what
// CUDA defines, and the faults the simulator promises to report -- deadlocks, shared-memory overruns, bad launch
// configurations, order-dependent results -- are reported. tests/test_cuda_sim.py runs them.
#include <pybind11/pybind11.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

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

// Lane 3 waits at a barrier while the rest of its warp waits for it in a full-warp shuffle: a deadlock.
__global__ void deadlock_kernel(int64_t* out) {
  if (threadIdx.x == 3) {
    __syncthreads();
    return;
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Lane 3 has exited before a full-warp shuffle: on sm_70+ the others go on (exited lanes are not waited for); the
// value lane 2 reads from lane 3 is undefined (the simulator gives all-one bits: -1).
__global__ void exited_lane_kernel(int64_t* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Two halves of a warp in different collectives at once (disjoint masks): legal, in every order.
__global__ void disjoint_kernel(int64_t* out) {
  const int lane = threadIdx.x % 32;
  int v;
  if (lane < 16) v = __shfl_xor_sync(0x0000ffffu, lane, 1);
  else v = __shfl_xor_sync(0xffff0000u, lane, 2);
  out[threadIdx.x] = v;
}

// Lanes that meet at __activemask aggregate: 32 converged lanes, 8 per value of lane / 8.
__global__ void activemask_kernel(int64_t* out) {
  const int lane = threadIdx.x % 32;
  const unsigned m = __activemask();
  out[threadIdx.x] = __popc(__match_any_sync(m, lane / 8));
}

// A static __shared__ array starts as garbage (NaN bytes here), not zeros.
__global__ void static_garbage_kernel(int64_t* out) {
  __shared__ float x[4];
  if (threadIdx.x == 0) x[0] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = (x[1] != x[1]) ? 1 : 0;
}

// One 16x16x16 WMMA product of small integers (exact in fp16 and fp32): A[i][k] = (i + 2k) % 5 - 2,
// B[k][j] = (3k + j) % 7 - 3; out[i * 16 + j] = C[i][j]. misalign: load A from one element past an aligned tile.
__global__ void wmma_kernel(int64_t* out, int misalign) {
  using namespace nvcuda;
  __shared__ __align__(32) __half a[16 * 16 + 16];
  __shared__ __align__(32) __half b[16 * 16];
  __shared__ __align__(32) float c[16 * 16];
  for (int e = threadIdx.x; e < 256; e += blockDim.x) {
    const int i = e / 16, k = e % 16;
    a[e + misalign] = __float2half_rn(static_cast<float>((i + 2 * k) % 5 - 2));
    b[e] = __float2half_rn(static_cast<float>((3 * i + k) % 7 - 3));  // row-major B[k = e / 16][j = e % 16]
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a + misalign, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x; e < 256; e += 32) out[e] = static_cast<int64_t>(c[e]);
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
    } else if (name == "exited_lane") {
      exited_lane_kernel<<<1, nt>>>(out);
    } else if (name == "disjoint") {
      disjoint_kernel<<<1, nt>>>(out);
    } else if (name == "activemask") {
      activemask_kernel<<<1, nt>>>(out);
    } else if (name == "static_garbage") {
      static_garbage_kernel<<<1, nt>>>(out);
    } else if (name == "wmma" || name == "wmma_misaligned") {
      wmma_kernel<<<1, 32>>>(out, name == "wmma" ? 0 : 1);
    } else {
      throw std::invalid_argument("unknown self-test " + name);
    }
    check(cudaGetLastError(), name.c_str());
  });
}

}  // namespace pyrag_sim
