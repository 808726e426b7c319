// CUDA entry points of pyrag.topk_ip (csrc/topk_ip_cuda.cu): framework-free, raw device pointers + a stream.
// Same semantics as the CPU kernel (csrc/topk_ip.h): scores [nq, k] desc, ids [nq, k], ties -> lower id, NaN = -inf.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace pyrag::topk {

// Largest k and D the CUDA kernels take (pyrag/ops/topk_ip.py uses a chunked torch path beyond them), and the
// largest N (ids are packed into 32 bits of a sort key).
constexpr int64_t kCudaMaxK = 4096;
constexpr int64_t kCudaMaxDim = 8192;
constexpr int64_t kCudaMaxN = (int64_t{1} << 31) - 1;

// Bytes of device scratch the search needs (candidate lists of every (query, doc chunk) pair and split queries):
// O(nq * k * chunks), with the chunk count chosen to keep it under ~192 MiB where possible. Depends on the
// current device's SM count, so call it with the same current device as topk_ip_cuda.
size_t cuda_workspace_bytes(int64_t nq, int64_t nb, int64_t dim, int64_t k, int dtype_code, bool exact_queries);

// queries [nq, dim] fp32, docs [nb, dim] T (float, half_t, bf16_t or int8_t), scale [nb] fp32 (int8) or null;
// exact_queries: the fp32 queries hold values of T (they came as fp16/bf16 like the docs), so the tensor-core path
// uses them as they are instead of splitting each into 2 (fp16) or 3 (bf16) parts of T;
// scores [nq, k] fp32, ids [nq, k] int64; workspace of cuda_workspace_bytes(...) bytes. All device memory; every
// launch goes on `stream`. Throws std::invalid_argument on bad sizes, std::runtime_error on a CUDA error.
template <class T>
void topk_ip_cuda(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                  int64_t k, bool exact_queries, float* scores, int64_t* ids, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream);

// Few queries (nq <= kCudaSketchMaxQ) over float docs with an int8 sketch (pyrag/ops/sketch.py): codes [nb, dim],
// sk_scale / sk_norm / sk_res [nb], coef [4, nq] the bound's constants from sketch_bound_constants (topk_ip.h).
// Reads the codes first and a doc's row only where the bound cannot rule it out; the same results, bit for bit, as
// topk_ip_cuda on the same queries and docs. Workspace: cuda_workspace_bytes(nq, nb, dim, k, dtype, false).
constexpr int64_t kCudaSketchMaxQ = 8;
template <class T>
void topk_ip_sketch_cuda(const float* queries, const T* docs, const int8_t* codes, const float* sk_scale,
                         const float* sk_norm, const float* sk_res, const float* coef, int64_t nq, int64_t nb,
                         int64_t dim, int64_t k, float* scores, int64_t* ids, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// Chunked-GEMM path (many queries on fp16/bf16 docs; pyrag/ops/topk_ip.py): the caller computes the scores of doc
// chunks of at most `chunk` docs with a tensor-core GEMM (cuBLAS through torch) and folds each [nq, n] fp32 chunk
// (row stride ld, docs doc0 .. doc0 + n, scores times qmul[q] when qmul is not null) into candidate lists kept in
// the workspace: first = the first chunk (lists start empty), last = the last one; then topk_select_finish_cuda
// writes scores [nq, k] and ids [nq, k]. Extra memory O(nq * k * columns), the lists only.
// variant: 0 the block kernel (16 queries per block), 1 the warp-per-list kernel; the same for all calls of a search.
size_t cuda_select_workspace_bytes(int64_t nq, int64_t k, int64_t chunk, int variant = 0);
void topk_select_cuda(const float* scores_chunk, int64_t ld, const float* qmul, int64_t nq, int64_t doc0, int64_t n,
                      int64_t k, int64_t chunk, bool first, bool last, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream, int variant = 0);
void topk_select_finish_cuda(int64_t nq, int64_t k, int64_t chunk, float* scores, int64_t* ids, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream, int variant = 0);

}  // namespace pyrag::topk
