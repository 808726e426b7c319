// Top-k inner-product search, framework-free: entry points of the CPU kernels (csrc/topk_ip_cpu.cpp) and the CUDA
// kernels (csrc/topk_ip_cuda.cu), templated on the docs' storage dtype. Raw pointers and sizes only; no pybind/torch.
#pragma once

#include <cstdint>

#include "common.h"

namespace pyrag::topk {

// ---------------------------------------------------------------------------------------------------------------
// Semantics shared by every kernel (pyrag/ops/topk_ip.py has checked the inputs):
//   queries [nq, dim] fp32 (the op converts fp16/bf16 queries, which is exact), docs [nb, dim] of T in
//   {float, half_t, bf16_t, int8_t}, scale [nb] fp32 for int8 docs (score = (q . docs[i]) * scale[i]), else null.
//   1 <= k <= nb. Output rows are sorted by (score descending, id ascending); a NaN score ranks as -inf.
// ---------------------------------------------------------------------------------------------------------------

// CPU instruction sets with a kernel. The wheel is built for baseline x86-64; the AVX2 (+FMA, F16C) and AVX-512
// (F, BW, VL) kernels are compiled per function and picked at run time.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// The best kernel this CPU (and OS) supports.
Isa best_cpu_isa();

struct CpuOptions {
  int threads = 1;      // OpenMP threads
  int64_t tile_n = 0;   // docs per tile (0: auto, about 192 KiB of doc rows so a tile stays in L2)
  int split = 0;        // 0: auto, 1: threads split the docs (then merge), 2: threads split the queries
  int parts = 0;        // with split 1: number of doc partitions (0: one per thread); tests force more
  int isa = -1;         // -1: best available; otherwise an Isa value no higher than best_cpu_isa()
  int path = 0;  // 0: auto, 1: fused SIMD dot products, 2: AMX bf16 prefilter + exact fp32 rescoring,
                 // 3: int8 sketch prefilter + exact rescoring (needs a Sketch)
};

// An int8 copy of float docs kept next to them (pyrag.ops.topk_ip.make_sketch builds it), read first so that a
// few-query search, which is memory bound, streams a quarter of the fp32 bytes. Per row i:
//   codes[i] * scale[i] approximates docs[i]; norm[i] >= |docs[i]| and res[i] >= |docs[i] - codes[i] * scale[i]|
//   (Euclidean norms, rounded up to fp32).
struct Sketch {
  const int8_t* codes;  // [nb, dim]
  const float* scale;   // [nb], >= 0
  const float* norm;    // [nb]
  const float* res;     // [nb]
};

// Whether the AMX prefilter can run here (AMX-TILE + AMX-BF16, AVX-512, Linux granted the tile state).
bool amx_usable();

// Per-query constants of the sketch prefilter's error bound for fp32 queries scored against int8 codes in fp32
// arithmetic (any summation order): writes ca, cb, e0, dlim ([4, nq], row-major) so that for every doc
//   |q . d - fl(q . codes) scale| + the exact scorer's own error + the fp32 evaluation of the test
//     <= ca |d| + cb |d - codes scale| + e0,   unless |d| > dlim (such docs are always rescored).
// False when some query is too large for int8-code sums or D too long for the analysis (no sketch then). The CUDA
// sketch kernel takes these constants from here, so both devices share one error analysis.
bool sketch_bound_constants(const float* queries, int64_t nq, int64_t dim, float* out);

// Fused search: tiled dot products + per-query threshold-filtered top-k buffers; never builds [nq, nb].
// With many queries on an AMX CPU (path 0 from nq >= 48, or path 2) the dot products first run in bf16 on AMX
// and only docs that a rigorous error bound cannot rule out get their exact fp32 score -- the same bits as the
// fused path. scores [nq, k] fp32 and ids [nq, k] int64 are written in full. Throws std::invalid_argument on bad
// options. Extra memory: O(threads * nq * k) candidates plus per-thread tiles.
// With a sketch (float docs only), every doc is first scored against its int8 codes -- by the SIMD kernels up to 12
// queries (path 0, or path 3), by the AMX prefilter beyond (path 0 where AMX exists, or path 2) -- and only docs a
// rigorous bound cannot rule out get their exact score: again the same bits as the fused path.
template <class T>
void topk_ip_cpu(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                 int64_t k, float* scores, int64_t* ids, const CpuOptions& opt, const Sketch* sketch = nullptr);

// The CUDA entry points are declared in csrc/topk_ip_cuda.h (it needs cuda_runtime.h for cudaStream_t).

}  // namespace pyrag::topk
