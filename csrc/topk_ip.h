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
};

// Fused search: tiled dot products + per-query threshold-filtered top-k buffers; never builds [nq, nb].
// scores [nq, k] fp32 and ids [nq, k] int64 are written in full. Throws std::invalid_argument on bad options.
template <class T>
void topk_ip_cpu(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                 int64_t k, float* scores, int64_t* ids, const CpuOptions& opt);

// One candidate of a running top-k (16 bytes; the Python op allocates arrays of them as int64 [.., 2]).
struct Hit {
  float score;
  int64_t id;
};
static_assert(sizeof(Hit) == 16, "Hit must be 16 bytes: Python allocates it as two int64");

// Streaming selection over score tiles computed elsewhere (the large-Q path: torch.mm fills a [nq, tn] tile, these
// functions keep the running top-k). State lives in caller-owned memory (torch.empty):
//   hits [nq, cap] Hit, count [nq] int64, thr [nq] fp32, with cap >= k + 1.
// select_init resets it; select_tile feeds tile[q * ld + j] as the score of doc id0 + j (j < tn) and must see
// increasing id0 (ties -> lower id relies on it); select_finish writes sorted [nq, k] results, nb being the number
// of docs fed in all (docs whose score was NaN or -inf fill any missing places as -inf, lowest ids first).
struct SelectState {
  Hit* hits;
  int64_t* count;
  float* thr;
  int64_t nq, k, cap;
};
void select_init(const SelectState& st);
void select_tile(const SelectState& st, const float* tile, int64_t tn, int64_t ld, int64_t id0, int threads,
                 int isa = -1);
void select_finish(const SelectState& st, int64_t nb, float* scores, int64_t* ids, int threads);

// bf16 prefilter (the large-Q path on CPUs with AMX; pyrag/ops/topk_ip.py drives it tile by tile):
// prefilter_convert turns doc rows [n, dim] into bf16 bits (dst; null for bf16 docs) and writes dnorm[i] >= the L2
// norm of dequantised row i; torch.mm(queries_bf16, tile^T) then gives approximate scores (bf16) and
// prefilter_select recomputes the exact fp32 score (same kernel as topk_ip_cpu) only for docs whose approximate
// score + qc[q] * dnorm[j] + e0[q] reaches the query's current k-th exact score, or dnorm[j] > dlim[q] (where
// overflow could void the bound), feeding them to the selection state.
// docs / scale are the whole arrays (row id0 + j); approx is [nq, ld] bf16 bits, dnorm [tn].
template <class T>
void prefilter_convert(const T* docs, int64_t n, int64_t dim, uint16_t* dst, float* dnorm, const float* scale,
                       int threads, int isa = -1);
template <class T>
void prefilter_select(const SelectState& st, const uint16_t* approx, int64_t ld, int64_t tn, int64_t id0,
                      const float* queries, const T* docs, const float* scale, int64_t dim, const float* qc,
                      const float* e0, const float* dlim, const float* dnorm, int threads, int isa = -1);

// The CUDA entry points are declared in csrc/topk_ip_cuda.h (it needs cuda_runtime.h for cudaStream_t).

}  // namespace pyrag::topk
