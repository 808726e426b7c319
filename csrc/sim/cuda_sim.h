// The CUDA simulator: runs pyrag's CUDA kernels (csrc/*_cuda.cu) on the CPU, so machines without a GPU (this
// project's CI) execute the kernels' logic -- indexing, tiling, selection, merging, warp protocols -- instead of
// only compiling it. Force-included (-include) before a .cu file compiled as C++ (see csrc/sim/sim_source.py,
// which also rewrites `kernel<<<grid, block, smem, stream>>>(args)` into `pyrag_sim::launch(...)(args)`).
//
// Model: every CUDA thread of a block is a fiber on the calling OS thread; blocks run one after another. A fiber
// runs until it reaches __syncthreads or a warp collective (__shfl_sync, __ballot_sync, __syncwarp, ...) and waits
// there until every thread the operation names has arrived or exited (sm_70+ rules: exited threads no longer hold
// back a barrier or a collective; reading an exited or unnamed lane's shuffle value gives all-one bits), as under
// Volta's independent thread scheduling. Lanes that meet at __activemask are the ones parked there when nothing
// else can run. So:
//   - a barrier or collective that a live thread never reaches is reported as a deadlock, not hung on;
//   - the order fibers run between synchronisation points is a setting (forward, reverse, seeded shuffle; the
//     same for blocks), so a kernel whose result depends on it has a race a test can see;
//   - shared memory starts as garbage (0xff bytes: NaN floats), static __shared__ variables once per block too;
//     dynamic shared memory is 256-byte aligned and guarded (a write past the launch's size is an error), and a
//     block's static + dynamic bytes, launches above 48 KiB without cudaFuncSetAttribute, and grid/block sizes are
//     checked against the device's limits;
//   - WMMA: every lane must pass the same 256-bit aligned pointer and a 16-byte multiple ldm; a lane stores only
//     its share of the tile (the rest is another lane's until a __syncwarp).
// Static __shared__ variables become function-local statics (one block runs at a time; launches are serialised).
// What it cannot check: global-memory bounds, memory ordering beyond the fiber interleavings (a missing __syncwarp
// between shuffles that already order the accesses here), __launch_bounds__, timing, and the last bits of
// floating point: the host compiler does not contract a*b+c into an fma where nvcc does (explicit fmaf is exact).
// WMMA fragments hold the whole 16x16 tile in every lane (the real layout is opaque to correct code anyway).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace pyrag_sim {

struct Coords {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
// Coordinates of the running fiber (set by the scheduler before it resumes one).
extern thread_local const Coords* current;

struct LaunchConfig {
  const void* fn;
  dim3 grid, block;
  size_t smem;
  const char* name;   // the kernel as the launch names it, and the host function launching it (for stats)
  const char* where;
};
// Runs body once per thread of every block of the grid (throws std::runtime_error on a deadlock or a guard hit;
// records a launch error for cudaGetLastError on a bad configuration, as CUDA does).
void run_grid(const LaunchConfig& c, const std::function<void()>& body);
void* dynamic_smem();
// Called where a static __shared__ variable is declared (csrc/sim/sim_source.py adds the call): fills it with 0xff
// bytes the first time a thread of each block gets there, as a GPU's shared memory starts as garbage, and checks the
// block's static + dynamic shared memory against the device's limits.
void shared_garbage(void* p, size_t bytes);
void syncthreads();
unsigned activemask();
unsigned lane_id();
[[noreturn]] void fail_in_kernel(const std::string& msg);
// Scheduling order of threads and blocks between synchronisation points (0 forward, 1 reverse, 2 shuffled with
// seed) and the multiprocessor count cudaDeviceGetAttribute reports (the kernels size their grids by it).
void configure(int order, uint64_t seed, int sms);
// Kernel launches and blocks run so far (tests check that an op really went through the simulator).
struct Stats {
  uint64_t launches, blocks;
  std::map<std::string, uint64_t> kernels;  // "kernel in host function" -> launches
};
Stats stats();
// Registers the simulator's self-test kernels (csrc/sim/selftest_kernels.cu) on the module.
void bind_selftests(void* pybind11_module);

enum Op : int { kShflIdx, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll, kMatchAny, kSyncWarp };
uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg);

template <class... P>
struct Launcher {
  void (*fn)(P...);
  LaunchConfig c;
  template <class... A>
  void operator()(A&&... a) const {
    // Converted once to the kernel's parameter types; every thread then gets its own by-value copy.
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    const auto f = fn;
    run_grid(c, [&args, f] { std::apply(f, args); });
  }
};

// `kernel<<<grid, block, smem, stream>>>(args)` becomes launch("kernel", __PRETTY_FUNCTION__, kernel, grid, ...)(args).
template <class... P>
Launcher<P...> launch(const char* name, const char* where, void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0,
                      cudaStream_t = nullptr) {
  return Launcher<P...>{fn, LaunchConfig{reinterpret_cast<const void*>(fn), grid, block, smem, name, where}};
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
void check_width(int width);

}  // namespace pyrag_sim

#define threadIdx (::pyrag_sim::current->thread)
#define blockIdx (::pyrag_sim::current->block)
#define blockDim (::pyrag_sim::current->block_dim)
#define gridDim (::pyrag_sim::current->grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads() { ::pyrag_sim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::pyrag_sim::warp_op(::pyrag_sim::kSyncWarp, mask, 0, 0); }
// The lanes that reach __activemask before anything else can run ("converged" here): in forward order usually the
// whole warp, so code that aggregates over the active lanes (__match_any_sync(__activemask(), ...)) is exercised.
inline unsigned __activemask() { return ::pyrag_sim::activemask(); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  ::pyrag_sim::check_width(width);
  return ::pyrag_sim::from_bits<T>(::pyrag_sim::warp_op(::pyrag_sim::kShflIdx, mask, ::pyrag_sim::to_bits(v), src));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::pyrag_sim::check_width(width);
  return ::pyrag_sim::from_bits<T>(
      ::pyrag_sim::warp_op(::pyrag_sim::kShflXor, mask, ::pyrag_sim::to_bits(v), lane_mask));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::pyrag_sim::check_width(width);
  return ::pyrag_sim::from_bits<T>(
      ::pyrag_sim::warp_op(::pyrag_sim::kShflUp, mask, ::pyrag_sim::to_bits(v), static_cast<int>(delta)));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::pyrag_sim::check_width(width);
  return ::pyrag_sim::from_bits<T>(
      ::pyrag_sim::warp_op(::pyrag_sim::kShflDown, mask, ::pyrag_sim::to_bits(v), static_cast<int>(delta)));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::pyrag_sim::warp_op(::pyrag_sim::kBallot, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(::pyrag_sim::warp_op(::pyrag_sim::kAny, mask, pred != 0, 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(::pyrag_sim::warp_op(::pyrag_sim::kAll, mask, pred != 0, 0));
}
template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(::pyrag_sim::warp_op(::pyrag_sim::kMatchAny, mask, ::pyrag_sim::to_bits(v), 0));
}

// Atomics: fibers of one launch share an OS thread and switch only at synchronisation points, so a plain
// read-modify-write is atomic here.
template <class T, class U>
T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old + static_cast<T>(v));
  return old;
}
template <class T, class U>
T atomicMax(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicMin(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) < old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicExch(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicCAS(T* p, U compare, U v) {
  const T old = *p;
  if (old == static_cast<T>(compare)) *p = static_cast<T>(v);
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// Cache-hinted loads are plain loads.
template <class T>
T __ldcs(const T* p) { return *p; }
template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcg(const T* p) { return *p; }
template <class T>
void __stcs(T* p, T v) { *p = v; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// Byte n of the result is byte (s >> 4n) & 7 of the 8-byte pool y:x (x the low half); selector bit 3 replicates
// that byte's sign bit instead.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t pool = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 15u;
    unsigned b = static_cast<unsigned>(pool >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) b = (b & 0x80u) ? 0xffu : 0u;
    r |= b << (8 * n);
  }
  return r;
}
inline unsigned __float_as_uint(float x) { return ::pyrag_sim::from_bits<unsigned>(::pyrag_sim::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::pyrag_sim::from_bits<float>(::pyrag_sim::to_bits(x)); }
inline int __float_as_int(float x) { return ::pyrag_sim::from_bits<int>(::pyrag_sim::to_bits(x)); }
inline float __int_as_float(int x) { return ::pyrag_sim::from_bits<float>(::pyrag_sim::to_bits(x)); }
inline long long __double_as_longlong(double x) {
  return ::pyrag_sim::from_bits<long long>(::pyrag_sim::to_bits(x));
}
inline double __longlong_as_double(long long x) { return ::pyrag_sim::from_bits<double>(::pyrag_sim::to_bits(x)); }
// Device-side min/max overloads (CUDA declares them at global scope for every arithmetic type).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
// nvcc's C++ overload of cudaFuncSetAttribute for a kernel (the runtime's C function takes const void*).
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
// Fast-math intrinsics at full precision (the simulator checks logic, not the last ulp).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }

// ---- WMMA (nvcuda::wmma) ------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // the whole tile, row-major, as fp32 (exact for fp16/bf16 inputs)
};

template <class Use, int M, int N, int K, class T, class L, class V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (float& e : f.x) e = static_cast<float>(v);
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// WMMA's rules, checked: every lane passes the same pointer and ldm; the pointer is 256-bit aligned and ldm a
// multiple of 16 bytes' worth of elements.
template <class P>
void check_wmma_args(const P* p, unsigned ldm) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (__shfl_sync(0xffffffffu, addr, 0) != addr || __shfl_sync(0xffffffffu, ldm, 0) != ldm)
    ::pyrag_sim::fail_in_kernel("WMMA load/store with a pointer or ldm that differs across the warp");
  if (addr % 32 != 0 || (ldm * sizeof(P)) % 16 != 0)
    ::pyrag_sim::fail_in_kernel("WMMA load/store needs a 256-bit aligned pointer and ldm a multiple of 16 bytes "
                                "(got address % 32 = " + std::to_string(addr % 32) + ", ldm = " +
                                std::to_string(ldm) + ")");
}

// A/B tiles: the fragment's layout type says how memory is ordered. Every lane reads the whole tile.
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value, "A/B fragments need a layout");
  check_wmma_args(p, ldm);
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = to_float(std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
  check_wmma_args(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
// Each lane writes its share of the tile (elements i with i % 32 == lane), as on a GPU: another lane's elements
// are visible to a lane only after a __syncwarp (or a barrier).
template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
  check_wmma_args(p, ldm);
  for (int i = static_cast<int>(::pyrag_sim::lane_id()); i < M * N; i += 32) {
    const int r = i / N, c = i % N;
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
}
// WMMA arguments are warp-uniform, so every lane holds the same tiles: lane 0 computes the product once and the
// other lanes copy its result (a 16x16x16 product per lane would make the tensor-core kernels 32x slower here).
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  auto* d0 = reinterpret_cast<fragment<accumulator, M, N, K, TC>*>(
      __shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(&d), 0));
  if (d0 == &d) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float s = c.x[i * N + j];
        for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
        out[i * N + j] = s;
      }
    std::memcpy(d.x, out, sizeof(out));
  }
  __syncwarp();
  if (d0 != &d) std::memcpy(d.x, d0->x, sizeof(d.x));
  __syncwarp();  // lane 0 may not change its fragment before every lane has copied it
}
}  // namespace wmma
}  // namespace nvcuda
