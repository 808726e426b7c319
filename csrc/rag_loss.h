// Framework-free declarations of the fused RAG-Sequence / RAG-Token marginalisation kernels (CPU side) and
// the small per-question combine step both the CPU and CUDA kernels share. No pybind11, no torch.
//
// Layout: logits [B, K, T, V] row-major (fp32 / bf16 / fp16), log_prior fp32 [B, K] or [B, K, T],
// target int64 [B, T], nll_mask / smooth_mask uint8 (torch.bool) [B, T]. All auxiliaries are fp32 and
// O(B*K*T): lse [B,K,T] (row logsumexps), w / u (posteriors, see below). Math: ../DESIGN.md "The math".
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

#if defined(__CUDACC__)
#define PYRAG_HD __host__ __device__ __forceinline__
#else
#define PYRAG_HD inline
#endif

namespace pyrag {

// Sizes of one problem. prior_per_token: log_prior is [B, K, T] (else [B, K], the same for every t).
struct RagDims {
  int64_t B, K, T, V;
  bool prior_per_token;
};

enum RagMode : int { kRagSequence = 0, kRagToken = 1 };

PYRAG_HD int64_t rag_prior_index(const RagDims& d, int64_t b, int64_t k, int64_t t) {
  return d.prior_per_token ? (b * d.K + k) * d.T + t : b * d.K + k;
}

// Forward scratch (fp32 floats): ly [B,K,T] target log-probs, sl [B,K,T] sum_v log-probs (sequence,
// epsilon > 0), sr [B,T] sum_v logsumexp_k (token, epsilon > 0).
PYRAG_HD int64_t rag_nll_scratch_floats(const RagDims& d) { return 2 * d.B * d.K * d.T + d.B * d.T; }

// max that keeps a NaN from either side (fmaxf drops it): a NaN log-likelihood must reach the loss.
PYRAG_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// ---- per-question combine (tiny: O(K*T) per b), shared by the CPU and CUDA forward ----
// Inputs: ly, sl, sr as above (only entries under the masks are read). Outputs for question b:
//   sequence: w[b,k] = softmax_k(A) with A = p + sum_t m ly (the passage posterior),
//             u[b,k] = softmax_k(C) with C = V p + sum_t s sl (0 when epsilon == 0)
//   token:    w[b,k,t] = m * softmax_k(p + ly) (0 at masked t); u[b,k,t] (sum_v r) is written by the
//             smoothing pass itself and left alone here.
//   loss[b] = -(1-eps) LL - (eps/V) S, the S term skipped when eps == 0 (so S = -inf cannot make 0*inf).
// Softmaxes over an all -inf set give 0 weights, never NaN; a NaN among the inputs makes the loss and weights NaN
// (the max keeps it, and "!= -inf" lets it through), as log_softmax would, instead of reading as "all -inf".
PYRAG_HD void rag_combine_question(const RagDims& d, int mode, float epsilon, int64_t b, const float* log_prior,
                                   const uint8_t* nll_mask, const uint8_t* smooth_mask, const float* ly,
                                   const float* sl, const float* sr, float* loss, float* w, float* u) {
  const int64_t K = d.K, T = d.T;
  const float ninf = -INFINITY;
  double ll = 0.0, smooth = 0.0;
  if (mode == kRagSequence) {
    // A_k is recomputed on each pass over k instead of stored: K is small and this keeps it allocation-free.
    float amax = ninf, cmax = ninf;
    for (int64_t k = 0; k < K; ++k) {
      float a = log_prior[b * K + k], c = static_cast<float>(d.V) * log_prior[b * K + k];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = (b * K + k) * T + t;
        if (nll_mask[b * T + t]) a += ly[r];
        if (epsilon > 0.0f && smooth_mask[b * T + t]) c += sl[r];
      }
      w[b * K + k] = a;  // stash A_k / C_k, turned into softmax weights below
      u[b * K + k] = c;
      amax = nan_max(amax, a);
      cmax = nan_max(cmax, c);
    }
    double asum = 0.0, csum = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      if (amax != ninf) asum += exp(static_cast<double>(w[b * K + k]) - amax);
      if (cmax != ninf) csum += exp(static_cast<double>(u[b * K + k]) - cmax);
    }
    ll = amax != ninf ? amax + log(asum) : static_cast<double>(ninf);
    smooth = cmax != ninf ? cmax + log(csum) : static_cast<double>(ninf);
    for (int64_t k = 0; k < K; ++k) {
      w[b * K + k] = amax != ninf ? static_cast<float>(exp(w[b * K + k] - ll)) : 0.0f;
      u[b * K + k] = (epsilon > 0.0f && cmax != ninf) ? static_cast<float>(exp(u[b * K + k] - smooth)) : 0.0f;
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      if (!nll_mask[b * T + t]) {
        for (int64_t k = 0; k < K; ++k) w[(b * K + k) * T + t] = 0.0f;
        continue;
      }
      float amax = ninf;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (b * K + k) * T + t;
        w[r] = log_prior[rag_prior_index(d, b, k, t)] + ly[r];
        amax = nan_max(amax, w[r]);
      }
      double asum = 0.0;
      if (amax != ninf)
        for (int64_t k = 0; k < K; ++k) asum += exp(static_cast<double>(w[(b * K + k) * T + t]) - amax);
      const double llt = amax != ninf ? amax + log(asum) : static_cast<double>(ninf);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = (b * K + k) * T + t;
        w[r] = amax != ninf ? static_cast<float>(exp(w[r] - llt)) : 0.0f;
      }
      ll += llt;
    }
    if (epsilon > 0.0f)
      for (int64_t t = 0; t < T; ++t)
        if (smooth_mask[b * T + t]) smooth += sr[b * T + t];
  }
  double out = -(1.0 - static_cast<double>(epsilon)) * ll;
  if (epsilon > 0.0f) out -= static_cast<double>(epsilon) / static_cast<double>(d.V) * smooth;
  loss[b] = static_cast<float>(out);
}

// Calls f(scalar_t{}) for the logits dtype code the Python op passed (DType in common.h).
template <typename F>
auto rag_dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::f32: return f(float{});
    case DType::f16: return f(half_t{});
    case DType::bf16: return f(bf16_t{});
    default: break;
  }
  throw std::invalid_argument("rag_loss: logits dtype code " + std::to_string(dtype) + " is not fp32/fp16/bf16");
}

// ---- CPU entry points (csrc/rag_loss_cpu.cpp), instantiated for float, bf16_t, half_t ----

// Caps the SIMD level of the CPU kernels (0 baseline x86-64/scalar, 1 AVX2+FMA, 2 AVX-512; -1 = best
// available) so tests can exercise every path on one machine. Returns the level that will be used.
int rag_loss_cpu_set_isa(int level);

// Forward of the marginal NLL. Writes loss [B], lse [B,K,T], w and u ([B,K] sequence, [B,K,T] token).
// scratch holds rag_nll_scratch_floats(d) floats. Returns -1, or the flat index b*T+t of the first target
// outside [0, V) at an nll_mask position (then nothing else is computed).
template <typename scalar_t>
int64_t rag_nll_forward_cpu(const scalar_t* logits, const float* log_prior, const int64_t* target,
                            const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d, int mode,
                            float epsilon, float* loss, float* lse, float* w, float* u, float* scratch,
                            int num_threads);

// Backward: grad_logits [B,K,T,V] in the logits' dtype, written once; may alias logits (in-place).
// grad_loss [B] fp32; lse, w, u as the forward wrote them.
template <typename scalar_t>
void rag_nll_backward_cpu(const float* grad_loss, const scalar_t* logits, const float* log_prior,
                          const int64_t* target, const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d,
                          int mode, float epsilon, const float* lse, const float* w, const float* u,
                          scalar_t* grad_logits, int num_threads);

// Token marginal: out [B,T,V] = logsumexp_k(p + log_softmax_v(logits)); lse [B,K,T] saved for backward.
template <typename scalar_t>
void rag_token_marginal_forward_cpu(const scalar_t* logits, const float* log_prior, RagDims d, float* out,
                                    float* lse, int num_threads);

// Its backward: grad_logits [B,K,T,V] (may alias logits), grad_prior [B,K,T] fp32 (summed over t by the
// caller when the prior is [B,K]).
template <typename scalar_t>
void rag_token_marginal_backward_cpu(const float* grad_out, const scalar_t* logits, const float* log_prior,
                                     RagDims d, const float* out, const float* lse, scalar_t* grad_logits,
                                     float* grad_prior, int num_threads);

}  // namespace pyrag
