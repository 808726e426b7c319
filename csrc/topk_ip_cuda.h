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
size_t cuda_workspace_bytes(int64_t nq, int64_t nb, int64_t dim, int64_t k, int dtype_code);

// queries [nq, dim] fp32, docs [nb, dim] T (float, half_t, bf16_t or int8_t), scale [nb] fp32 (int8) or null;
// scores [nq, k] fp32, ids [nq, k] int64; workspace of cuda_workspace_bytes(...) bytes. All device memory; every
// launch goes on `stream`. Throws std::invalid_argument on bad sizes, std::runtime_error on a CUDA error.
template <class T>
void topk_ip_cuda(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                  int64_t k, float* scores, int64_t* ids, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

}  // namespace pyrag::topk
