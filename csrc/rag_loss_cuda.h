// Declarations of the CUDA side of the fused RAG marginalisation (csrc/rag_loss_cuda.cu). Same arguments and
// layouts as the CPU entry points in rag_loss.h, logits passed untyped with the dtype code, plus the stream the
// kernels launch on. Every launch is checked; failures throw std::runtime_error. No allocation happens here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rag_loss.h"

namespace pyrag {

void rag_nll_forward_cuda(int dtype, const void* logits, const float* log_prior, const int64_t* target,
                          const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d, int mode, float epsilon,
                          float* loss, float* lse, float* w, float* u, float* scratch, cudaStream_t stream);

void rag_nll_backward_cuda(int dtype, const float* grad_loss, const void* logits, const float* log_prior,
                           const int64_t* target, const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d,
                           int mode, float epsilon, const float* lse, const float* w, const float* u,
                           void* grad_logits, cudaStream_t stream);

void rag_token_marginal_forward_cuda(int dtype, const void* logits, const float* log_prior, RagDims d, float* out,
                                     float* lse, cudaStream_t stream);

void rag_token_marginal_backward_cuda(int dtype, const float* grad_out, const void* logits, const float* log_prior,
                                      RagDims d, const float* out, const float* lse, void* grad_logits,
                                      float* grad_prior, cudaStream_t stream);

}  // namespace pyrag
