// CUDA kernels of the fused RAG-Sequence / RAG-Token marginalisation (declared in rag_loss_cuda.h): one block
// per row (b,k,t) or per group (b,t), warp-shuffle + shared-memory block reductions, fp32 math for every dtype,
// launched on the caller's stream. Never materialises anything [B,K,T,V]-sized except the gradient itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rag_loss_cuda.h"

namespace pyrag {
namespace {

constexpr int kThreads = 256;  // per block; a multiple of 32, at most 1024
constexpr int kKChunk = 16;    // passages whose per-thread accumulators live in registers at once

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename S>
__device__ __forceinline__ S from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. sh: 32 slots of shared memory.
template <typename T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = threadIdx.x < nw ? sh[threadIdx.x] : T(0);
  if (wid == 0) v = warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  return sh[0];
}

// Online log-sum-exp state (max m, sum s of exp(x - m)); an all -inf set is (-inf, 0). A NaN makes the state
// (NaN, NaN) for good, so the result is NaN (as log_softmax gives) instead of reading as an all -inf set.
__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
  if (x == -INFINITY) return;  // contributes exp(-inf) = 0; skipping it avoids (-inf) - (-inf)
  if (x != x) {
    m = s = x;
    return;
  }
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float M = m != m ? m : (m2 != m2 ? m2 : fmaxf(m, m2));  // fmaxf alone would drop a NaN
  if (M == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * expf(m - M)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - M));
  m = M;
}

// Block-wide merge of the (m, s) states, returned to every thread.
__device__ void block_lse(float& m, float& s, float* shm, float* shs) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(m, s, m2, s2);
  }
  __syncthreads();
  if (lane == 0) {
    shm[wid] = m;
    shs[wid] = s;
  }
  __syncthreads();
  if (wid == 0) {
    m = lane < nw ? shm[lane] : -INFINITY;
    s = lane < nw ? shs[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
      shm[0] = m;
      shs[0] = s;
    }
  }
  __syncthreads();
  m = shm[0];
  s = shs[0];
}

__device__ __forceinline__ int64_t row_index(const RagDims& d, int64_t b, int64_t k, int64_t t) {
  return (b * d.K + k) * d.T + t;
}

// Pass 1, one block per row r = (b,k,t): lse, target log-prob ly, and sl = sum_v (z - lse). With all_rows the
// masks are ignored (token marginal); otherwise rows under neither mask are skipped. An out-of-range target at a
// counted position gives ly = NaN (Python validates targets; this keeps a bad one from reading out of bounds).
template <typename S>
__global__ void row_stats_kernel(const S* __restrict__ logits, RagDims d, const int64_t* __restrict__ target,
                                 const uint8_t* __restrict__ nll_mask, const uint8_t* __restrict__ smooth_mask,
                                 bool all_rows, bool smoothing, float* __restrict__ lse, float* __restrict__ ly,
                                 float* __restrict__ sl) {
  __shared__ float shm[32], shs[32];
  __shared__ double shd[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / (d.K * d.T), t = r % d.T;
  bool m = false, s = false;
  if (!all_rows) {
    m = nll_mask[b * d.T + t];
    s = smoothing && smooth_mask[b * d.T + t];
    if (!m && !s) {
      if (threadIdx.x == 0) lse[r] = ly[r] = sl[r] = 0.0f;
      return;
    }
  }
  const S* z = logits + r * d.V;
  float mx = -INFINITY, se = 0.0f, sz = 0.0f;
  for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
    const float x = to_f(z[v]);
    lse_push(mx, se, x);
    sz += x;
  }
  block_lse(mx, se, shm, shs);
  const double szd = s ? block_sum<double>(static_cast<double>(sz), shd) : 0.0;
  if (threadIdx.x == 0) {
    const double l = mx == -INFINITY ? -INFINITY : static_cast<double>(mx) + log(static_cast<double>(se));
    lse[r] = static_cast<float>(l);
    if (!all_rows) {
      float yl = 0.0f;
      if (m) {
        const int64_t y = target[b * d.T + t];
        yl = (y >= 0 && y < d.V) ? static_cast<float>(to_f(z[y]) - l) : NAN;
      }
      ly[r] = yl;
      sl[r] = s ? static_cast<float>(szd - static_cast<double>(d.V) * l) : 0.0f;
    }
  }
}

// Pass 2 of the token loss with smoothing, one block per group (b,t): sr = sum_v logsumexp_k(p + l) and
// u[b,k,t] = sum_v softmax_k(p + l)[k]. Passages are taken kKChunk at a time (per-thread accumulators in
// registers), so the K rows are read once for K <= kKChunk.
template <typename S>
__global__ void token_smooth_fwd_kernel(const S* __restrict__ logits, const float* __restrict__ log_prior, RagDims d,
                                        const uint8_t* __restrict__ smooth_mask, const float* __restrict__ lse,
                                        float* __restrict__ sr, float* __restrict__ u) {
  extern __shared__ float off[];  // [K]: p_k - lse_k
  __shared__ double shd[32];
  const int64_t g = blockIdx.x, b = g / d.T, t = g % d.T;
  if (!smooth_mask[g]) {
    if (threadIdx.x == 0) sr[g] = 0.0f;
    for (int64_t k = threadIdx.x; k < d.K; k += blockDim.x) u[row_index(d, b, k, t)] = 0.0f;
    return;
  }
  for (int64_t k = threadIdx.x; k < d.K; k += blockDim.x)
    off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[row_index(d, b, k, t)];
  __syncthreads();
  const S* z0 = logits + row_index(d, b, 0, t) * d.V;
  const int64_t kstride = d.T * d.V;  // distance between the rows (b,k,t) and (b,k+1,t)
  for (int64_t k0 = 0; k0 < d.K; k0 += kKChunk) {
    float acc[kKChunk];
#pragma unroll
    for (int i = 0; i < kKChunk; ++i) acc[i] = 0.0f;
    float part = 0.0f;
    for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
      float M = -INFINITY, ssum = 0.0f;
      for (int64_t k = 0; k < d.K; ++k) lse_push(M, ssum, to_f(z0[k * kstride + v]) + off[k]);
      if (k0 == 0) part += M == -INFINITY ? -INFINITY : M + logf(ssum);
      if (M == -INFINITY) continue;
      const float inv = 1.0f / ssum;
#pragma unroll
      for (int i = 0; i < kKChunk; ++i) {
        const int64_t k = k0 + i;
        if (k < d.K) acc[i] += expf(to_f(z0[k * kstride + v]) + off[k] - M) * inv;
      }
    }
    if (k0 == 0) {
      const double tot = block_sum<double>(static_cast<double>(part), shd);
      if (threadIdx.x == 0) sr[g] = static_cast<float>(tot);
    }
#pragma unroll
    for (int i = 0; i < kKChunk; ++i) {
      if (k0 + i >= d.K) break;  // uniform across the block, so the __syncthreads inside stay matched
      const double a = block_sum<double>(static_cast<double>(acc[i]), shd);
      if (threadIdx.x == 0) u[row_index(d, b, k0 + i, t)] = static_cast<float>(a);
    }
  }
}

// Pass 3, one thread per question: the O(K*T) combine shared with the CPU (rag_loss.h).
__global__ void combine_kernel(RagDims d, int mode, float epsilon, const float* log_prior, const uint8_t* nll_mask,
                               const uint8_t* smooth_mask, const float* ly, const float* sl, const float* sr,
                               float* loss, float* w, float* u) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < d.B) rag_combine_question(d, mode, epsilon, b, log_prior, nll_mask, smooth_mask, ly, sl, sr, loss, w, u);
}

// Backward, one block per row: g = alpha+beta times softmax, minus beta/V, minus alpha at the target.
// Token rows whose group carries smoothing are left to token_smooth_bwd_kernel. In-place safe (each element is
// read, then written, by the same thread).
template <typename S>
__global__ void row_grad_kernel(const float* __restrict__ grad_loss, const S* logits, RagDims d, int mode,
                                float epsilon, const int64_t* __restrict__ target,
                                const uint8_t* __restrict__ nll_mask, const uint8_t* __restrict__ smooth_mask,
                                const float* __restrict__ lse, const float* __restrict__ w,
                                const float* __restrict__ u, S* grad) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / (d.K * d.T), k = (r / d.T) % d.K, t = r % d.T;
  const bool smooth = epsilon > 0.0f && smooth_mask[b * d.T + t];
  if (mode == kRagToken && smooth) return;
  const float g = grad_loss[b];
  const bool m = nll_mask[b * d.T + t];
  float alpha, beta;
  if (mode == kRagSequence) {
    alpha = m ? g * (1.0f - epsilon) * w[b * d.K + k] : 0.0f;
    beta = smooth ? g * epsilon * u[b * d.K + k] : 0.0f;
  } else {
    alpha = g * (1.0f - epsilon) * w[r];  // w is 0 where nll_mask is
    beta = 0.0f;
  }
  const float a = alpha + beta, c = beta / static_cast<float>(d.V), l = lse[r];
  const int64_t y = m ? target[b * d.T + t] : -1;
  const S* z = logits + r * d.V;
  S* gr = grad + r * d.V;
  if (a == 0.0f && c == 0.0f && alpha == 0.0f) {
    for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) gr[v] = from_f<S>(0.0f);
    return;
  }
  for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
    float val = a * expf(to_f(z[v]) - l) - c;
    if (v == y) val -= alpha;
    gr[v] = from_f<S>(val);
  }
}

// Backward of the token loss with smoothing, one block per smoothed group (b,t):
// grad_k[v] = coef_k P_k[v] - gamma r_k[v] - alpha_k [v == y], r = softmax_k(p + l), coef_k = alpha_k + gamma u_k.
template <typename S>
__global__ void token_smooth_bwd_kernel(const float* __restrict__ grad_loss, const S* logits,
                                        const float* __restrict__ log_prior, RagDims d, float epsilon,
                                        const int64_t* __restrict__ target, const uint8_t* __restrict__ nll_mask,
                                        const uint8_t* __restrict__ smooth_mask, const float* __restrict__ lse,
                                        const float* __restrict__ w, const float* __restrict__ u, S* grad) {
  extern __shared__ float sh[];  // off[K], lse[K], coef[K], alpha[K]
  float* off = sh;
  float* lk = sh + d.K;
  float* coef = sh + 2 * d.K;
  float* alpha = sh + 3 * d.K;
  const int64_t g = blockIdx.x, b = g / d.T, t = g % d.T;
  if (!smooth_mask[g]) return;  // row_grad_kernel did these rows
  const float gl = grad_loss[b];
  const float gamma = gl * epsilon / static_cast<float>(d.V);
  for (int64_t k = threadIdx.x; k < d.K; k += blockDim.x) {
    const int64_t r = row_index(d, b, k, t);
    lk[k] = lse[r];
    off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
    alpha[k] = gl * (1.0f - epsilon) * w[r];
    coef[k] = alpha[k] + gamma * u[r];
  }
  __syncthreads();
  const int64_t y = nll_mask[g] ? target[g] : -1;
  const int64_t r0 = row_index(d, b, 0, t), kstride = d.T * d.V;
  const S* z0 = logits + r0 * d.V;
  S* g0 = grad + r0 * d.V;
  for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
    float M = -INFINITY, ssum = 0.0f;
    for (int64_t k = 0; k < d.K; ++k) lse_push(M, ssum, to_f(z0[k * kstride + v]) + off[k]);
    const float inv = M == -INFINITY ? 0.0f : 1.0f / ssum;
    for (int64_t k = 0; k < d.K; ++k) {
      const float x = to_f(z0[k * kstride + v]);
      const float rk = M == -INFINITY ? 0.0f : expf(x + off[k] - M) * inv;
      float val = coef[k] * expf(x - lk[k]) - gamma * rk;
      if (v == y) val -= alpha[k];
      g0[k * kstride + v] = from_f<S>(val);
    }
  }
}

// Token marginal, one block per group (b,t): out[v] = logsumexp_k(z_k[v] + p_k - lse_k).
template <typename S>
__global__ void marginal_fwd_kernel(const S* __restrict__ logits, const float* __restrict__ log_prior, RagDims d,
                                    const float* __restrict__ lse, float* __restrict__ out) {
  extern __shared__ float off[];
  const int64_t g = blockIdx.x, b = g / d.T, t = g % d.T;
  for (int64_t k = threadIdx.x; k < d.K; k += blockDim.x)
    off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[row_index(d, b, k, t)];
  __syncthreads();
  const S* z0 = logits + row_index(d, b, 0, t) * d.V;
  const int64_t kstride = d.T * d.V;
  for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
    float M = -INFINITY, ssum = 0.0f;
    for (int64_t k = 0; k < d.K; ++k) lse_push(M, ssum, to_f(z0[k * kstride + v]) + off[k]);
    out[g * d.V + v] = M == -INFINITY ? -INFINITY : M + logf(ssum);
  }
}

// Token marginal backward, one block per group: c_k = sum_v G r_k (the prior's gradient), then
// grad_k[v] = G[v] r_k[v] - c_k P_k[v], with r_k[v] = exp(z_k[v] + p_k - lse_k - out[v]).
template <typename S>
__global__ void marginal_bwd_kernel(const float* __restrict__ grad_out, const S* __restrict__ logits,
                                    const float* __restrict__ log_prior, RagDims d, const float* __restrict__ out,
                                    const float* __restrict__ lse, S* __restrict__ grad,
                                    float* __restrict__ grad_prior) {
  extern __shared__ float sh[];  // off[K], lse[K], c[K]
  float* off = sh;
  float* lk = sh + d.K;
  float* c = sh + 2 * d.K;
  __shared__ double shd[32];
  const int64_t g = blockIdx.x, b = g / d.T, t = g % d.T;
  for (int64_t k = threadIdx.x; k < d.K; k += blockDim.x) {
    const int64_t r = row_index(d, b, k, t);
    lk[k] = lse[r];
    off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
  }
  __syncthreads();
  const int64_t r0 = row_index(d, b, 0, t), kstride = d.T * d.V;
  const S* z0 = logits + r0 * d.V;
  S* g0 = grad + r0 * d.V;
  const float* o = out + g * d.V;
  const float* go = grad_out + g * d.V;
  for (int64_t k0 = 0; k0 < d.K; k0 += kKChunk) {
    float acc[kKChunk];
#pragma unroll
    for (int i = 0; i < kKChunk; ++i) acc[i] = 0.0f;
    for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
      const float ov = o[v], gv = go[v];
      if (ov == -INFINITY) continue;
#pragma unroll
      for (int i = 0; i < kKChunk; ++i) {
        const int64_t k = k0 + i;
        if (k < d.K) acc[i] += gv * expf(to_f(z0[k * kstride + v]) + off[k] - ov);
      }
    }
#pragma unroll
    for (int i = 0; i < kKChunk; ++i) {
      if (k0 + i >= d.K) break;  // uniform across the block
      const double a = block_sum<double>(static_cast<double>(acc[i]), shd);
      if (threadIdx.x == 0) {
        c[k0 + i] = static_cast<float>(a);
        grad_prior[row_index(d, b, k0 + i, t)] = static_cast<float>(a);
      }
    }
  }
  __syncthreads();
  for (int64_t v = threadIdx.x; v < d.V; v += blockDim.x) {
    const float ov = o[v], gv = go[v];
    for (int64_t k = 0; k < d.K; ++k) {
      const float x = to_f(z0[k * kstride + v]);
      const float rk = ov == -INFINITY ? 0.0f : expf(x + off[k] - ov);
      g0[k * kstride + v] = from_f<S>(gv * rk - c[k] * expf(x - lk[k]));
    }
  }
}

// ---- host side ----

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("pyrag rag_loss CUDA kernel ") + what + ": " +
                                                 cudaGetErrorString(e));
}

// Dynamic shared memory for n per-passage float arrays; refuses K too large for one block's shared memory.
size_t k_smem(const RagDims& d, int n) {
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(d.K) * sizeof(float);
  if (bytes > 40 * 1024) throw std::invalid_argument("rag_loss CUDA: K=" + std::to_string(d.K) + " passages is too many");
  return bytes;
}

// Grids are one block per row / group; refuse sizes a grid cannot hold (2^31 - 1 blocks).
void check_grid(const RagDims& d) {
  if (d.B * d.K * d.T > int64_t{0x7fffffff})
    throw std::invalid_argument("rag_loss CUDA: B*K*T = " + std::to_string(d.B * d.K * d.T) + " rows is too many");
}

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(__half{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    default: break;
  }
  throw std::invalid_argument("rag_loss CUDA: logits dtype code " + std::to_string(dtype) + " is not fp32/fp16/bf16");
}

}  // namespace

void rag_nll_forward_cuda(int dtype, const void* logits, const float* log_prior, const int64_t* target,
                          const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d, int mode, float epsilon,
                          float* loss, float* lse, float* w, float* u, float* scratch, cudaStream_t stream) {
  if (d.B == 0) return;
  check_grid(d);
  const int64_t rows = d.B * d.K * d.T, groups = d.B * d.T;
  float* ly = scratch;
  float* sl = scratch + rows;
  float* sr = scratch + 2 * rows;
  const bool smoothing = epsilon > 0.0f;
  dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    const S* z = static_cast<const S*>(logits);
    if (rows > 0) {
      row_stats_kernel<S><<<rows, kThreads, 0, stream>>>(z, d, target, nll_mask, smooth_mask, false, smoothing, lse,
                                                          ly, sl);
      check_launch("row_stats");
    }
    if (mode == kRagToken && rows > 0) {
      if (smoothing) {
        token_smooth_fwd_kernel<S><<<groups, kThreads, k_smem(d, 1), stream>>>(z, log_prior, d, smooth_mask, lse,
                                                                                  sr, u);
        check_launch("token_smooth_fwd");
      } else {
        const cudaError_t e = cudaMemsetAsync(u, 0, rows * sizeof(float), stream);
        if (e != cudaSuccess) throw std::runtime_error(std::string("pyrag rag_loss memset: ") + cudaGetErrorString(e));
      }
    }
  });
  combine_kernel<<<(d.B + 127) / 128, 128, 0, stream>>>(d, mode, epsilon, log_prior, nll_mask, smooth_mask, ly, sl,
                                                         sr, loss, w, u);
  check_launch("combine");
}

void rag_nll_backward_cuda(int dtype, const float* grad_loss, const void* logits, const float* log_prior,
                           const int64_t* target, const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d,
                           int mode, float epsilon, const float* lse, const float* w, const float* u,
                           void* grad_logits, cudaStream_t stream) {
  const int64_t rows = d.B * d.K * d.T, groups = d.B * d.T;
  if (rows == 0) return;
  check_grid(d);
  dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    const S* z = static_cast<const S*>(logits);
    S* g = static_cast<S*>(grad_logits);
    row_grad_kernel<S><<<rows, kThreads, 0, stream>>>(grad_loss, z, d, mode, epsilon, target, nll_mask, smooth_mask,
                                                       lse, w, u, g);
    check_launch("row_grad");
    if (mode == kRagToken && epsilon > 0.0f) {
      token_smooth_bwd_kernel<S><<<groups, kThreads, k_smem(d, 4), stream>>>(
          grad_loss, z, log_prior, d, epsilon, target, nll_mask, smooth_mask, lse, w, u, g);
      check_launch("token_smooth_bwd");
    }
  });
}

void rag_token_marginal_forward_cuda(int dtype, const void* logits, const float* log_prior, RagDims d, float* out,
                                     float* lse, cudaStream_t stream) {
  const int64_t rows = d.B * d.K * d.T, groups = d.B * d.T;
  if (rows == 0) return;
  check_grid(d);
  dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    const S* z = static_cast<const S*>(logits);
    row_stats_kernel<S><<<rows, kThreads, 0, stream>>>(z, d, nullptr, nullptr, nullptr, true, false, lse, nullptr,
                                                        nullptr);
    check_launch("row_stats");
    marginal_fwd_kernel<S><<<groups, kThreads, k_smem(d, 1), stream>>>(z, log_prior, d, lse, out);
    check_launch("marginal_fwd");
  });
}

void rag_token_marginal_backward_cuda(int dtype, const float* grad_out, const void* logits, const float* log_prior,
                                      RagDims d, const float* out, const float* lse, void* grad_logits,
                                      float* grad_prior, cudaStream_t stream) {
  const int64_t rows = d.B * d.K * d.T, groups = d.B * d.T;
  if (rows == 0) return;
  check_grid(d);
  dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    marginal_bwd_kernel<S><<<groups, kThreads, k_smem(d, 3), stream>>>(
        grad_out, static_cast<const S*>(logits), log_prior, d, out, lse, static_cast<S*>(grad_logits), grad_prior);
    check_launch("marginal_bwd");
  });
}

}  // namespace pyrag
