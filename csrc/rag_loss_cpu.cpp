// CPU kernels of the fused RAG-Sequence / RAG-Token marginalisation (declared in rag_loss.h): OpenMP over
// rows (b,k,t) or groups (b,t), inner loops over V written to auto-vectorise, compiled twice (baseline x86-64
// and AVX2+FMA, chosen at run time). Never materialises anything [B,K,T,V]-sized except the gradient itself.
// The branch-free selects below (clamps, -inf guards) only if-convert into vector blends when comparisons
// are not treated as trapping; nothing here relies on floating-point exceptions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <omp.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "rag_loss.h"

namespace pyrag {
namespace {

#define PYRAG_AI inline __attribute__((always_inline))

constexpr int64_t kChunk = 512;     // v-chunk of the group passes: K rows x 512 floats stay in L1/L2
constexpr float kNegInf = -INFINITY;

template <typename To, typename From>
PYRAG_AI To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// ---- branch-free (so vectorisable) element loads / stores ----
PYRAG_AI float ld(const float* p, int64_t i) { return p[i]; }
PYRAG_AI float ld(const bf16_t* p, int64_t i) { return bits_as<float>(static_cast<uint32_t>(p[i].bits) << 16); }
PYRAG_AI float ld(const half_t* p, int64_t i) {
  const uint32_t h = p[i].bits;
  const uint32_t em = h & 0x7fffu;
  // Shifting exponent+mantissa into place and scaling by 2^112 rebiases normals and subnormals alike;
  // inf/nan (exponent 31) get the float exponent forced to 255 instead.
  const float mag = bits_as<float>(em << 13) * 5.192296858534828e+33f;
  const float special = bits_as<float>((em << 13) | 0x7f800000u);
  const float a = em >= 0x7c00u ? special : mag;
  return bits_as<float>(bits_as<uint32_t>(a) | ((h & 0x8000u) << 16));
}

PYRAG_AI void st(float* p, int64_t i, float v) { p[i] = v; }
PYRAG_AI void st(bf16_t* p, int64_t i, float v) {  // round to nearest even (gradients are finite)
  uint32_t u = bits_as<uint32_t>(v);
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i].bits = static_cast<uint16_t>(u >> 16);
}
PYRAG_AI void st(half_t* p, int64_t i, float v) {  // round to nearest even, overflow -> inf
  const uint32_t f0 = bits_as<uint32_t>(v);
  const uint32_t sign = f0 & 0x80000000u;
  const uint32_t f = f0 ^ sign;
  // subnormal halves: let the fp32 adder do the rounding by adding a magic number
  const float sub = bits_as<float>(f) + bits_as<float>(126u << 23);
  const uint32_t o_sub = bits_as<uint32_t>(sub) - (126u << 23);
  const uint32_t o_norm = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;  // rebias 127 -> 15 and round
  const uint32_t o_big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t o = f >= (143u << 23) ? o_big : (f < (113u << 23) ? o_sub : o_norm);
  p[i].bits = static_cast<uint16_t>(o | (sign >> 16));
}

// expf to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes), 2^n through the exponent bits.
// Branch-free so loops over it vectorise. x < -87.34 (incl. -inf) gives 0; x > 88 saturates at e^88.
PYRAG_AI float fexp(float x) {
  const bool under = x < -87.33654f;
  x = under ? -87.33654f : x;
  x = x > 88.0f ? 88.0f : x;
  float fx = x * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 pushes the fraction out
  const int32_t n = static_cast<int32_t>(fx);
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * r * r + r + 1.0f) * bits_as<float>(static_cast<uint32_t>(n + 127) << 23);
  return under ? 0.0f : y;
}

// logf for positive normal x (Cephes): frexp through the bits, degree-8 polynomial around 1.
PYRAG_AI float flog(float x) {
  const uint32_t u = bits_as<uint32_t>(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 126;
  float m = bits_as<float>((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// ---- per-row and per-group bodies (inlined into the baseline and the AVX2 wrappers below) ----

// One row z[0..V): lse = logsumexp_v z and sum_l = sum_v (z - lse). A row that is all -inf gets -inf; a row
// holding a NaN gets NaN (as log_softmax gives), which then reaches the loss and the row's gradient.
// Two sweeps: the max streams the row from memory, the exps re-read it from cache (a chunked online
// log-sum-exp measured no faster). fp32 lane sums per block, double across blocks.
template <typename S>
PYRAG_AI void row_stats_body(const S* z, int64_t V, float* lse, float* sum_l) {
  constexpr int64_t kSumBlock = 4096;
  float m = kNegInf;
  int nans = 0;  // counted in the same (memory-bound) sweep: a max alone skips NaN
#pragma omp simd reduction(max : m) reduction(+ : nans)
  for (int64_t v = 0; v < V; ++v) {
    const float x = ld(z, v);
    m = x > m ? x : m;
    nans += x != x;
  }
  if (nans) {
    *lse = std::numeric_limits<float>::quiet_NaN();
    *sum_l = *lse;
    return;
  }
  if (!(m > kNegInf)) {
    *lse = kNegInf;
    *sum_l = kNegInf;
    return;
  }
  double se = 0.0, sz = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kSumBlock) {
    const int64_t v1 = std::min(V, v0 + kSumBlock);
    float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t v = v0; v < v1; ++v) {
      const float x = ld(z, v) - m;
      s1 += fexp(x);
      s2 += x;
    }
    se += s1;
    sz += s2;
  }
  const double lse_m = std::log(se);
  *lse = static_cast<float>(m + lse_m);
  *sum_l = static_cast<float>(sz - static_cast<double>(V) * lse_m);
}

// One gradient row: g[v] = a * softmax(z)[v] - c, then g[y] -= alpha (y < 0: no target). g may alias z.
template <typename S>
PYRAG_AI void row_grad_body(const S* z, S* g, int64_t V, float lse, float a, float c, int64_t y, float alpha) {
  if (a == 0.0f && c == 0.0f && alpha == 0.0f) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) st(g, v, 0.0f);
    return;
  }
  const float zy = y >= 0 ? ld(z, y) : 0.0f;  // read before an in-place write overwrites it
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) st(g, v, a * fexp(ld(z, v) - lse) - c);
  if (y >= 0) st(g, y, a * fexp(zy - lse) - c - alpha);
}

// Per-thread buffers of the group passes (K rows x kChunk).
struct GroupBuf {
  std::vector<float> q, e, mx, sum, inv, off, acc;
  explicit GroupBuf(int64_t K)
      : q(K * kChunk), e(K * kChunk), mx(kChunk), sum(kChunk), inv(kChunk), off(K), acc(K) {}
};

// Loads n values of the K rows rows[k] + v0 into q[k*kChunk + j] as z + off[k]; then per j:
// mx = max_k q, e[k] = exp(q[k] - mx), sum = sum_k e, inv = 1/sum (0 where all K are -inf).
template <typename S>
PYRAG_AI void group_softmax_k(const S* const* rows, int64_t K, int64_t v0, int64_t n, GroupBuf& gb) {
  float* q = gb.q.data();
  float* e = gb.e.data();
  float* mx = gb.mx.data();
  float* sum = gb.sum.data();
  float* inv = gb.inv.data();
  for (int64_t k = 0; k < K; ++k) {
    const S* row = rows[k] + v0;
    float* qk = q + k * kChunk;
    const float off = gb.off[k];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) qk[j] = ld(row, j) + off;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) mx[j] = q[j];
  for (int64_t k = 1; k < K; ++k) {
    const float* qk = q + k * kChunk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) mx[j] = (qk[j] > mx[j] || qk[j] != qk[j]) ? qk[j] : mx[j];  // keeps NaN
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) sum[j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* qk = q + k * kChunk;
    float* ek = e + k * kChunk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = mx[j] != kNegInf ? fexp(qk[j] - mx[j]) : 0.0f;  // NaN passes: fexp(NaN) is NaN
      ek[j] = x;
      sum[j] += x;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) inv[j] = mx[j] != kNegInf ? 1.0f / sum[j] : 0.0f;
}

// Token smoothing, forward, group (b,t): off[k] = p_k - lse_k set by the caller. Returns
// sum_v logsumexp_k(p_k + l_k[v]) and writes acc[k] = sum_v softmax_k(p + l)[k, v].
template <typename S>
PYRAG_AI double group_smooth_fwd_body(const S* const* rows, int64_t K, int64_t V, GroupBuf& gb) {
  double total = 0.0;
  std::vector<double> acc(K, 0.0);
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    group_softmax_k(rows, K, v0, n, gb);
    const float* mx = gb.mx.data();
    const float* sum = gb.sum.data();
    const float* inv = gb.inv.data();
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = 0; j < n; ++j) part += mx[j] != kNegInf ? mx[j] + flog(sum[j]) : kNegInf;
    total += part;
    for (int64_t k = 0; k < K; ++k) {
      const float* ek = gb.e.data() + k * kChunk;
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int64_t j = 0; j < n; ++j) a += ek[j] * inv[j];
      acc[k] += a;
    }
  }
  for (int64_t k = 0; k < K; ++k) gb.acc[k] = static_cast<float>(acc[k]);
  return total;
}

// Token smoothing, backward, group (b,t): grad_k[v] = coef[k] P_k[v] - gamma r_k[v] - alpha[k] [v == y],
// P_k = softmax_v z_k, r_k = softmax_k(p + l)[k]. off[k] = p_k - lse_k, coef / alpha / lse passed in.
// grads[k] may alias rows[k]: each chunk is fully loaded before it is written.
template <typename S>
PYRAG_AI void group_smooth_bwd_body(const S* const* rows, S* const* grads, int64_t K, int64_t V, int64_t y,
                                    const float* lse, const float* coef, const float* alpha, float gamma,
                                    GroupBuf& gb) {
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    group_softmax_k(rows, K, v0, n, gb);
    const float* inv = gb.inv.data();
    for (int64_t k = 0; k < K; ++k) {
      // z is re-read from cache (not recovered from q = z + off, which is -inf for a -inf prior)
      const S* row = rows[k] + v0;
      float* ek = gb.e.data() + k * kChunk;
      const float lk = lse[k], ck = coef[k];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ek[j] = ck * fexp(ld(row, j) - lk) - gamma * ek[j] * inv[j];
      if (y >= v0 && y < v0 + n) ek[y - v0] -= alpha[k];
      S* g = grads[k] + v0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) st(g, j, ek[j]);
    }
  }
}

// Token marginal, forward, group (b,t): out[v] = logsumexp_k(z_k[v] + off[k]), off[k] = p_k - lse_k.
template <typename S>
PYRAG_AI void group_marginal_fwd_body(const S* const* rows, int64_t K, int64_t V, float* out, GroupBuf& gb) {
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    group_softmax_k(rows, K, v0, n, gb);
    const float* mx = gb.mx.data();
    const float* sum = gb.sum.data();
    float* o = out + v0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = mx[j] != kNegInf ? mx[j] + flog(sum[j]) : kNegInf;
  }
}

// Token marginal, backward, group (b,t): with r_k[v] = exp(z_k[v] + off[k] - out[v]) and G = grad_out,
// c_k = sum_v G r_k (-> acc, the prior's gradient) and grad_k[v] = G[v] r_k[v] - c_k softmax_v(z_k)[v].
template <typename S>
PYRAG_AI void group_marginal_bwd_body(const S* const* rows, S* const* grads, int64_t K, int64_t V,
                                      const float* out, const float* gout, const float* lse, GroupBuf& gb) {
  std::vector<double> c(K, 0.0);
  for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
    const int64_t n = std::min(kChunk, V - v0);
    const float* o = out + v0;
    const float* go = gout + v0;
    for (int64_t k = 0; k < K; ++k) {
      const S* row = rows[k] + v0;
      const float off = gb.off[k];
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int64_t j = 0; j < n; ++j) a += o[j] != kNegInf ? go[j] * fexp(ld(row, j) + off - o[j]) : 0.0f;
      c[k] += a;
    }
  }
  for (int64_t k = 0; k < K; ++k) gb.acc[k] = static_cast<float>(c[k]);
  for (int64_t k = 0; k < K; ++k) {
    const S* row = rows[k];
    S* g = grads[k];
    const float off = gb.off[k], l = lse[k], ck = gb.acc[k];
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float x = ld(row, v);
      const float r = out[v] != kNegInf ? fexp(x + off - out[v]) : 0.0f;
      st(g, v, gout[v] * r - ck * fexp(x - l));
    }
  }
}

// ---- baseline / AVX2 instantiations and the run-time choice between them ----
#if defined(__x86_64__) || defined(_M_X64)
#define PYRAG_AVX2_ATTR __attribute__((noinline, target("avx2,fma")))
#define PYRAG_AVX512_ATTR \
  __attribute__((noinline, target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512")))
#define PYRAG_HAVE_AVX2 1
#else
#define PYRAG_HAVE_AVX2 0
#endif

#define PYRAG_DEFINE_ISA_PAIR(ret, name, params, args)                                  \
  template <typename S>                                                                 \
  __attribute__((noinline)) ret name##_base params { return name##_body<S> args; }      \
  PYRAG_DEFINE_AVX2(ret, name, params, args)

#if PYRAG_HAVE_AVX2
#define PYRAG_DEFINE_AVX2(ret, name, params, args)                              \
  template <typename S>                                                         \
  PYRAG_AVX2_ATTR ret name##_avx2 params { return name##_body<S> args; }        \
  template <typename S>                                                         \
  PYRAG_AVX512_ATTR ret name##_avx512 params { return name##_body<S> args; }
#else
#define PYRAG_DEFINE_AVX2(ret, name, params, args)
#endif

PYRAG_DEFINE_ISA_PAIR(void, row_stats, (const S* z, int64_t V, float* lse, float* sum_l), (z, V, lse, sum_l))
PYRAG_DEFINE_ISA_PAIR(void, row_grad,
                      (const S* z, S* g, int64_t V, float lse, float a, float c, int64_t y, float alpha),
                      (z, g, V, lse, a, c, y, alpha))
PYRAG_DEFINE_ISA_PAIR(double, group_smooth_fwd, (const S* const* rows, int64_t K, int64_t V, GroupBuf& gb),
                      (rows, K, V, gb))
PYRAG_DEFINE_ISA_PAIR(void, group_smooth_bwd,
                      (const S* const* rows, S* const* grads, int64_t K, int64_t V, int64_t y, const float* lse,
                       const float* coef, const float* alpha, float gamma, GroupBuf& gb),
                      (rows, grads, K, V, y, lse, coef, alpha, gamma, gb))
PYRAG_DEFINE_ISA_PAIR(void, group_marginal_fwd,
                      (const S* const* rows, int64_t K, int64_t V, float* out, GroupBuf& gb),
                      (rows, K, V, out, gb))
PYRAG_DEFINE_ISA_PAIR(void, group_marginal_bwd,
                      (const S* const* rows, S* const* grads, int64_t K, int64_t V, const float* out,
                       const float* gout, const float* lse, GroupBuf& gb),
                      (rows, grads, K, V, out, gout, lse, gb))

bool use_avx512() {
#if PYRAG_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

bool use_avx2() {
#if PYRAG_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

std::atomic<int> g_isa_cap{2};  // highest ISA level the kernels may use (rag_loss_cpu_set_isa)

// Function table for one dtype: the widest variant the CPU supports (and g_isa_cap allows).
template <typename S>
struct Kern {
  decltype(&row_stats_base<S>) row_stats = &row_stats_base<S>;
  decltype(&row_grad_base<S>) row_grad = &row_grad_base<S>;
  decltype(&group_smooth_fwd_base<S>) smooth_fwd = &group_smooth_fwd_base<S>;
  decltype(&group_smooth_bwd_base<S>) smooth_bwd = &group_smooth_bwd_base<S>;
  decltype(&group_marginal_fwd_base<S>) marginal_fwd = &group_marginal_fwd_base<S>;
  decltype(&group_marginal_bwd_base<S>) marginal_bwd = &group_marginal_bwd_base<S>;
  Kern() {
#if PYRAG_HAVE_AVX2
    const int cap = g_isa_cap.load(std::memory_order_relaxed);
    if (cap >= 2 && use_avx512()) {
      row_stats = &row_stats_avx512<S>;
      row_grad = &row_grad_avx512<S>;
      smooth_fwd = &group_smooth_fwd_avx512<S>;
      smooth_bwd = &group_smooth_bwd_avx512<S>;
      marginal_fwd = &group_marginal_fwd_avx512<S>;
      marginal_bwd = &group_marginal_bwd_avx512<S>;
    } else if (cap >= 1 && use_avx2()) {
      row_stats = &row_stats_avx2<S>;
      row_grad = &row_grad_avx2<S>;
      smooth_fwd = &group_smooth_fwd_avx2<S>;
      smooth_bwd = &group_smooth_bwd_avx2<S>;
      marginal_fwd = &group_marginal_fwd_avx2<S>;
      marginal_bwd = &group_marginal_bwd_avx2<S>;
    }
#endif
  }
};

inline int64_t row_of(const RagDims& d, int64_t b, int64_t k, int64_t t) { return (b * d.K + k) * d.T + t; }

// A freshly allocated gradient (torch.empty_like) is untouched memory: writing it costs a page fault per 4 KiB,
// about as much as the kernel itself. Asking for transparent huge pages first (a hint; no effect where THP is
// off or the pages already exist, e.g. the in-place gradient) cuts that to one fault per 2 MiB.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < int64_t{8} << 20) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

int rag_loss_cpu_set_isa(int level) {
  g_isa_cap.store(level < 0 ? 2 : level, std::memory_order_relaxed);
  return level < 0 || level >= 2 ? (use_avx512() ? 2 : use_avx2() ? 1 : 0) : (level == 1 && use_avx2() ? 1 : 0);
}

template <typename S>
int64_t rag_nll_forward_cpu(const S* logits, const float* log_prior, const int64_t* target, const uint8_t* nll_mask,
                            const uint8_t* smooth_mask, RagDims d, int mode, float epsilon, float* loss, float* lse,
                            float* w, float* u, float* scratch, int num_threads) {
  const int64_t B = d.B, K = d.K, T = d.T, V = d.V;
  for (int64_t i = 0; i < B * T; ++i)
    if (nll_mask[i] && (target[i] < 0 || target[i] >= V)) return i;
  const Kern<S> kern;
  const bool smoothing = epsilon > 0.0f;
  float* ly = scratch;
  float* sl = scratch + B * K * T;
  float* sr = scratch + 2 * B * K * T;
  const int64_t rows = B * K * T;

  // Pass 1, per row: logsumexp, target log-prob, sum of log-probs. Rows under neither mask are skipped.
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (K * T), t = r % T;
    const bool m = nll_mask[b * T + t], s = smoothing && smooth_mask[b * T + t];
    if (!m && !s) {
      lse[r] = ly[r] = sl[r] = 0.0f;
      continue;
    }
    const S* z = logits + r * V;
    kern.row_stats(z, V, &lse[r], &sl[r]);
    ly[r] = m ? ld(z, target[b * T + t]) - lse[r] : 0.0f;
  }

  // Pass 2 (token mode with smoothing), per group (b,t): sum_v logsumexp_k over the K rows read together.
  if (mode == kRagToken) {
    for (int64_t i = 0; i < B * K * T; ++i) u[i] = 0.0f;
    if (smoothing) {
#pragma omp parallel num_threads(num_threads)
      {
        GroupBuf gb(K);
        std::vector<const S*> rp(K);
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < B * T; ++g) {
          const int64_t b = g / T, t = g % T;
          if (!smooth_mask[g]) {
            sr[g] = 0.0f;
            continue;
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = row_of(d, b, k, t);
            rp[k] = logits + r * V;
            gb.off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
          }
          sr[g] = static_cast<float>(kern.smooth_fwd(rp.data(), K, V, gb));
          for (int64_t k = 0; k < K; ++k) u[row_of(d, b, k, t)] = gb.acc[k];
        }
      }
    }
  }

  // Pass 3, per question: combine the O(K*T) statistics into the loss and the posteriors.
  for (int64_t b = 0; b < B; ++b)
    rag_combine_question(d, mode, epsilon, b, log_prior, nll_mask, smooth_mask, ly, sl, sr, loss, w, u);
  return -1;
}

template <typename S>
void rag_nll_backward_cpu(const float* grad_loss, const S* logits, const float* log_prior, const int64_t* target,
                          const uint8_t* nll_mask, const uint8_t* smooth_mask, RagDims d, int mode, float epsilon,
                          const float* lse, const float* w, const float* u, S* grad_logits, int num_threads) {
  const int64_t B = d.B, K = d.K, T = d.T, V = d.V;
  const Kern<S> kern;
  const bool smoothing = epsilon > 0.0f;
  const float inv_v = 1.0f / static_cast<float>(V);
  if (static_cast<const void*>(grad_logits) != static_cast<const void*>(logits))
    advise_huge_pages(grad_logits, B * K * T * V * static_cast<int64_t>(sizeof(S)));

  if (mode == kRagSequence) {
    // Row (b,k,t): dL/dz = alpha (P - onehot(y)) + beta (P - 1/V), alpha = g (1-eps) w m, beta = g eps u s.
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
    for (int64_t r = 0; r < B * K * T; ++r) {
      const int64_t b = r / (K * T), k = (r / T) % K, t = r % T;
      const float g = grad_loss[b];
      const bool m = nll_mask[b * T + t];
      const float alpha = m ? g * (1.0f - epsilon) * w[b * K + k] : 0.0f;
      const float beta = smoothing && smooth_mask[b * T + t] ? g * epsilon * u[b * K + k] : 0.0f;
      kern.row_grad(logits + r * V, grad_logits + r * V, V, lse[r], alpha + beta, beta * inv_v,
                    m ? target[b * T + t] : -1, alpha);
    }
    return;
  }

  // Token: group (b,t). Without smoothing each row is alpha (P - onehot(y)), alpha = g (1-eps) w[b,k,t];
  // with it, every v also needs r = softmax_k(p + l) over the K rows, so the K rows are read together.
#pragma omp parallel num_threads(num_threads)
  {
    GroupBuf gb(K);
    std::vector<const S*> rp(K);
    std::vector<S*> gp(K);
    std::vector<float> lk(K), coef(K), alpha(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < B * T; ++grp) {
      const int64_t b = grp / T, t = grp % T;
      const float g = grad_loss[b];
      const bool m = nll_mask[grp];
      const int64_t y = m ? target[grp] : -1;
      const float gamma = smoothing && smooth_mask[grp] ? g * epsilon * inv_v : 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of(d, b, k, t);
        rp[k] = logits + r * V;
        gp[k] = grad_logits + r * V;
        lk[k] = lse[r];
        alpha[k] = g * (1.0f - epsilon) * w[r];  // w is 0 where nll_mask is
        coef[k] = alpha[k] + gamma * u[r];
        gb.off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
      }
      if (gamma == 0.0f) {
        for (int64_t k = 0; k < K; ++k) kern.row_grad(rp[k], gp[k], V, lk[k], alpha[k], 0.0f, y, alpha[k]);
      } else {
        kern.smooth_bwd(rp.data(), gp.data(), K, V, y, lk.data(), coef.data(), alpha.data(), gamma, gb);
      }
    }
  }
}

template <typename S>
void rag_token_marginal_forward_cpu(const S* logits, const float* log_prior, RagDims d, float* out, float* lse,
                                    int num_threads) {
  const int64_t B = d.B, K = d.K, T = d.T, V = d.V;
  const Kern<S> kern;
#pragma omp parallel num_threads(num_threads)
  {
    float unused;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < B * K * T; ++r) kern.row_stats(logits + r * V, V, &lse[r], &unused);
    GroupBuf gb(K);
    std::vector<const S*> rp(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < B * T; ++grp) {
      const int64_t b = grp / T, t = grp % T;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of(d, b, k, t);
        rp[k] = logits + r * V;
        gb.off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
      }
      kern.marginal_fwd(rp.data(), K, V, out + grp * V, gb);
    }
  }
}

template <typename S>
void rag_token_marginal_backward_cpu(const float* grad_out, const S* logits, const float* log_prior, RagDims d,
                                     const float* out, const float* lse, S* grad_logits, float* grad_prior,
                                     int num_threads) {
  const int64_t B = d.B, K = d.K, T = d.T, V = d.V;
  const Kern<S> kern;
  if (static_cast<const void*>(grad_logits) != static_cast<const void*>(logits))
    advise_huge_pages(grad_logits, B * K * T * V * static_cast<int64_t>(sizeof(S)));
#pragma omp parallel num_threads(num_threads)
  {
    GroupBuf gb(K);
    std::vector<const S*> rp(K);
    std::vector<S*> gp(K);
    std::vector<float> lk(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < B * T; ++grp) {
      const int64_t b = grp / T, t = grp % T;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = row_of(d, b, k, t);
        rp[k] = logits + r * V;
        gp[k] = grad_logits + r * V;
        lk[k] = lse[r];
        gb.off[k] = log_prior[rag_prior_index(d, b, k, t)] - lse[r];
      }
      kern.marginal_bwd(rp.data(), gp.data(), K, V, out + grp * V, grad_out + grp * V, lk.data(), gb);
      for (int64_t k = 0; k < K; ++k) grad_prior[row_of(d, b, k, t)] = gb.acc[k];
    }
  }
}

#define PYRAG_INSTANTIATE_RAG_LOSS(S)                                                                          \
  template int64_t rag_nll_forward_cpu<S>(const S*, const float*, const int64_t*, const uint8_t*,             \
                                          const uint8_t*, RagDims, int, float, float*, float*, float*, float*, \
                                          float*, int);                                                        \
  template void rag_nll_backward_cpu<S>(const float*, const S*, const float*, const int64_t*, const uint8_t*, \
                                        const uint8_t*, RagDims, int, float, const float*, const float*,       \
                                        const float*, S*, int);                                                \
  template void rag_token_marginal_forward_cpu<S>(const S*, const float*, RagDims, float*, float*, int);       \
  template void rag_token_marginal_backward_cpu<S>(const float*, const S*, const float*, RagDims,             \
                                                   const float*, const float*, S*, float*, int);

PYRAG_INSTANTIATE_RAG_LOSS(float)
PYRAG_INSTANTIATE_RAG_LOSS(bf16_t)
PYRAG_INSTANTIATE_RAG_LOSS(half_t)

}  // namespace pyrag
